"""Run by tests/test_fm_ddp.py: OT-coupled flow matching for a few steps on 2 CPU ranks (gloo).

Each rank saves the prepared batches it trained on (noise, data, times) and its final weights to OUT/rank<r>.pt.
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
        self.batches.append([batch.x0.clone(), batch.x1.clone(), batch.t.clone()])


def main(out: Path, steps: int) -> None:
    L.seed_everything(0)
    dm = GenerativeDataModule("8gaussians", batch_size=32, seed=3)
    model = FlowMatching(data_shape=dm.data_shape, hidden=16, depth=1, coupling="ot", ot_block_size=8)
    recorder = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, dm)
    torch.save({"batches": [torch.stack(parts) for parts in zip(*recorder.batches)],
                "state_dict": model.state_dict(), "rank": trainer.global_rank}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together

    main(Path(sys.argv[1]), int(sys.argv[2]))
    end_distributed()
