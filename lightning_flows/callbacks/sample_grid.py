"""Write a picture of samples every validation epoch and hand it to the active logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_flows.plotting import save_sample_figure


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: the logger's version directory, else the trainer's root."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class SampleGridCallback(L.Callback):
    """Every ``every_n_epochs`` validation epochs, draw ``n`` samples to ``<run dir>/samples/``.

    Images become a grid in pixel space (through the DataModule's ``to_pixels``); 2D data a scatter
    plot beside the validation data. Sampling runs on global rank zero only and involves no
    collective operation, so the other ranks never wait on it.
    """

    def __init__(self, n: int = 64, every_n_epochs: int = 1, seed: int = 0):
        super().__init__()
        self.n, self.every_n_epochs, self.seed = n, every_n_epochs, seed
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        datamodule = trainer.datamodule
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed)
            samples = pl_module.sample(self.n)
        reference = datamodule.split("val")[: 2000] if samples.ndim == 2 else None
        path = run_dir(trainer) / "samples" / f"epoch{trainer.current_epoch:04d}.png"
        save_sample_figure(datamodule.to_pixels(samples), path, reference=reference,
                           title=f"{type(pl_module).__name__}, epoch {trainer.current_epoch}")
        self.last_path = path
        self._log_image(trainer, path)

    @staticmethod
    def _log_image(trainer: L.Trainer, path: Path) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                import numpy as np
                from PIL import Image

                image = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("samples", image, trainer.global_step, dataformats="HWC")
