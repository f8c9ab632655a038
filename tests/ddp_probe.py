"""Run by tests/test_ddp.py: train flow matching a few steps with 2 CPU ranks (gloo) under DDP.

Lightning's "ddp" strategy relaunches this script once per extra rank, exactly as it would for a
user's training script. Each rank saves the batches it saw and its final weights to OUT/rank<r>.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import FlowMatching


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch.detach().clone())


def main(out: Path, steps: int) -> None:
    L.seed_everything(0)
    dm = GenerativeDataModule("8gaussians", batch_size=64)
    model = FlowMatching(data_shape=dm.data_shape, hidden=32, depth=2)
    recorder = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, dm)
    torch.save({"batches": torch.stack(recorder.batches), "state_dict": model.state_dict(),
                "world_size": trainer.world_size, "global_step": trainer.global_step},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
