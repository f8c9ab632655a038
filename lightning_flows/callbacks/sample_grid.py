"""Write a picture of samples every validation epoch and at the end of training, and hand it to the logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_flows.callbacks.run_directory import run_dir
from lightning_flows.plotting import save_sample_figure

__all__ = ["SampleGridCallback", "run_dir"]


class SampleGridCallback(L.Callback):
    """Every ``every_n_epochs`` validation epochs, draw ``n`` samples to ``<run dir>/samples/``.

    Images become a grid in pixel space (through the DataModule's ``to_pixels``); 2D data a scatter
    plot beside the validation data. Sampling runs on global rank zero only and involves no
    collective operation, so the other ranks never wait on it.

    :meth:`draw_final` writes ``samples/final.png`` from a checkpoint's evaluation weights when a run
    stops (called by :class:`~lightning_flows.callbacks.checkpointing.RunCheckpoint` after it saves
    ``last.ckpt``), so every run ends with a picture of what ``lightning-flows sample`` would draw.
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
        self._draw(trainer, pl_module, f"epoch{trainer.current_epoch:04d}.png",
                   f"{type(pl_module).__name__}, epoch {trainer.current_epoch}")

    def draw_final(self, trainer: L.Trainer, pl_module, checkpoint_path: str | Path) -> None:
        """On rank zero, draw ``samples/final.png`` with the evaluation weights of ``checkpoint_path``."""
        if not trainer.is_global_zero or self.n <= 0:
            return
        from lightning_flows.checkpoints import evaluation_weights, read_checkpoint

        weights = evaluation_weights(read_checkpoint(checkpoint_path, map_location=pl_module.device))
        training_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        was_training = pl_module.training
        # Eval mode as in validation: batch norm uses its running statistics (and a SyncBatchNorm
        # layer then needs no other rank).
        pl_module.eval()
        try:
            pl_module.load_state_dict(weights)
            self._draw(trainer, pl_module, "final.png",
                       f"{type(pl_module).__name__}, final (step {trainer.global_step})")
        finally:
            pl_module.load_state_dict(training_weights)
            pl_module.train(was_training)

    def _draw(self, trainer: L.Trainer, pl_module, filename: str, title: str) -> None:
        if self.n <= 0:  # `--sample_grid.n 0` turns the pictures off
            return
        datamodule = trainer.datamodule
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        per_row = None
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed)
            if getattr(pl_module, "is_conditional", False):
                # One row per class (n // K samples each, at least one): shows whether the labels are followed.
                per_row = max(1, self.n // pl_module.num_classes)
                labels = torch.arange(pl_module.num_classes, device=pl_module.device).repeat_interleave(per_row)
                samples = pl_module.sample(len(labels), y=labels)
            else:
                samples = pl_module.sample(self.n)
        reference = datamodule.split("val")[: 2000] if samples.ndim == 2 else None
        path = run_dir(trainer) / "samples" / filename
        save_sample_figure(datamodule.to_pixels(samples), path, reference=reference, title=title, per_row=per_row)
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
