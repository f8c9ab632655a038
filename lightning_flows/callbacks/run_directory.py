"""Where a run's files are, and telling the user: ``<root>/<name>/<version or id>/``.

The CLI points every logger at one directory (:mod:`lightning_flows.logger_placement`); this module is
how the callbacks find it (checkpoints, sample grids) and :class:`RunDirectoryReport` prints it when a
run starts and when it ends.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: the first logger's version directory (a wandb run's ``save_dir``, which the
    CLI sets to ``<root>/<name>/<id>``), else the trainer's root.

    Computed locally: ``trainer.log_dir`` broadcasts from rank 0 under DDP, a collective that would
    hang (or pair with another rank's unrelated collective) when called on rank 0 alone.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    else:
        directory = None
    return Path(directory or trainer.default_root_dir)


def experiment_dir(trainer: L.Trainer) -> Path | None:
    """``<root>/<name>``: the directory holding every version of this run's experiment (None without a logger)."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(logger.root_dir)
    return run_dir(trainer).parent


class RunDirectoryReport(L.Callback):
    """Print the run directory when a run starts and when it ends (global rank zero only). On by default
    in every CLI run."""

    def __init__(self):
        super().__init__()
        self._announced: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self._announced != stage:
            self._announced = stage
            rank_zero_info(f"Run directory: {run_dir(trainer)}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"Everything of this run is in {run_dir(trainer)}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"Run stopped by {type(exception).__name__}; its files are in {run_dir(trainer)}")
