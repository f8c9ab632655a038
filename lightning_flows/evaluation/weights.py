"""Which weights are evaluated: the ones a user samples from.

``lightning-flows sample`` loads a run's EMA weights when the run kept them (``EMACallback``), so every
evaluation reports on those too and records which it used (``"ema"`` or ``"training"``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def ema_callback(trainer):
    """The run's ``EMACallback``, or None."""
    from lightning_flows.callbacks.ema import EMACallback  # here: callbacks import this package

    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)


def weights_in_use(trainer) -> str:
    """``"ema"`` while an EMA callback has its averaged weights swapped into the model, else ``"training"``."""
    callback = ema_callback(trainer)
    return "ema" if callback is not None and callback.swapped_in else "training"


@contextmanager
def sampling_weights(trainer, model) -> Iterator[str]:
    """Swap in the weights ``lightning-flows sample`` would use (EMA if the run kept an average) for the
    duration of the block; yields their label."""
    callback = ema_callback(trainer)
    if callback is None or callback.shadow is None or callback.swapped_in:
        yield weights_in_use(trainer)
        return
    callback.swap_in(model)
    try:
        yield "ema"
    finally:
        callback.swap_out(model)
