"""Run by tests/test_performance.py: 2 CPU ranks (gloo) train a small flow-matching UNet on digits with every
performance switch a CPU can run (fused Adam, channels_last, torch.compile with the tracing-only backend)
and the non-finite guard skipping on the device; rank 1 alone gets a NaN batch at step 1.
Each rank saves OUT/rank<r>.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_flows.callbacks import NonFiniteGuard
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import FlowMatching
from lightning_flows.performance import PerformanceOptions


class NaNOnRankOne(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 1:
            batch[0] = float("nan")


def main(out: Path, steps: int) -> None:
    L.seed_everything(0)
    dm = GenerativeDataModule("digits", batch_size=16)
    model = FlowMatching(data_shape=dm.data_shape, base_channels=8, channel_mults=(1, 2))
    guard = NonFiniteGuard(check_every_n_steps=1)
    options = PerformanceOptions(fused_adam="true", channels_last=True, compile=True, compile_backend="eager")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[NaNOnRankOne(), guard, options])
    trainer.fit(model, dm)
    conv = model.velocity.down_blocks[0].conv1.weight
    torch.save({"state_dict": model.state_dict(), "skipped": guard.skipped_steps,
                "fused": all(g["fused"] for g in trainer.optimizers[0].param_groups),
                "channels_last": conv.is_contiguous(memory_format=torch.channels_last),
                "compiled": options.compiled, "global_step": trainer.global_step},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together

    main(Path(sys.argv[1]), int(sys.argv[2]))
    end_distributed()
