"""Run by tests/test_conditional_generation.py: a class-conditional family for a few steps on 2 CPU ranks
(gloo) on labelled digits. Each rank saves the images and labels it trained on and its final weights."""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import Diffusion, FlowMatching


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = (batch.x1, batch.y) if hasattr(batch, "x1") else batch
        self.batches.append((x.clone(), y.clone()))


def main(out: Path, family: str, steps: int) -> None:
    L.seed_everything(0)
    dm = GenerativeDataModule("digits", batch_size=16, seed=0, conditional=True)
    common = dict(data_shape=dm.data_shape, num_classes=dm.num_classes, base_channels=8, channel_mults=(1, 2))
    model = (FlowMatching(**common, coupling="ot", ot_block_size=8) if family == "flow_matching"
             else Diffusion(**common, num_steps=20))
    recorder = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, dm)
    torch.save({"x": torch.cat([x for x, _ in recorder.batches]), "y": torch.cat([y for _, y in recorder.batches]),
                "state_dict": model.state_dict()}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together

    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    end_distributed()
