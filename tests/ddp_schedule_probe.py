"""Run by tests/test_schedule.py: 2 CPU ranks (gloo) train under a *time* budget with a cosine schedule
and an EMA; each rank saves the learning rate of every step, its weights and its EMA to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_flows.callbacks import EMACallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import FlowMatching


class RecordRates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def main(out: Path, seconds: float) -> None:
    L.seed_everything(0)
    dm = GenerativeDataModule("8gaussians", batch_size=64)
    model = FlowMatching(data_shape=dm.data_shape, hidden=16, depth=1, lr_schedule="cosine", warmup_steps=2)
    recorder, ema = RecordRates(), EMACallback(decay=0.99)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_time={"seconds": seconds}, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, ema])
    trainer.fit(model, dm)
    torch.save({"rates": recorder.rates, "state_dict": model.state_dict(), "ema": ema.shadow,
                "global_step": trainer.global_step}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together

    main(Path(sys.argv[1]), float(sys.argv[2]))
    end_distributed()
