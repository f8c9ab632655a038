"""The one place where lightning-flows silences messages of its dependencies that a user cannot act on.

Every entry is an exact message with the reason it is noise *for a lightning-flows run*. Causes are fixed
where we own them (the CLI's default ``log_every_n_steps``, the wandb arguments in
:mod:`lightning_flows.logger_placement`); what is left here comes from inside Lightning or torch. Warnings
that tell a user something about their run are never filtered.
"""

from __future__ import annotations

import logging
import warnings

# (regular expression matched at the start of the message, category, why it is noise)
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning,
     "the `lightning-flows` entry point passes its own arguments on purpose: sys.argv still holds the outer "
     "command (`lightning-flows benchmark ...`), and must, since Lightning's DDP launcher re-runs it per rank"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "raised by torch >= 2.10 inside Lightning's own pytree helper; only a Lightning release can change it"),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning,
     "with manual optimisation (the GAN) a checkpoint holds the state after the batch's optimizer steps, which "
     "is exactly what resuming needs, since the batch is not replayed"),
)

# Lightning's advertisements for its cloud services, logged at INFO on every run.
NOISY_LOG_PREFIXES = ("💡 Tip: For seamless cloud",)
LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_LOG_PREFIXES)


_LOG_FILTER = _DropPrefixes()


def silence_known_noise() -> None:
    """Install the filters above (idempotent; called by every CLI and benchmark run)."""
    for message, category, _why in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if _LOG_FILTER not in logger.filters:
        logger.addFilter(_LOG_FILTER)
