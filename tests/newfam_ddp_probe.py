"""Run by tests/test_newfam_ddp.py: TarFlow and MeanFlow (unconditional and class-conditional) through their committed
configs and the CLI's defaults, a few steps on 2 CPU ranks (gloo) under DDP.

Each family is one ``lightning-flows fit --config experiments/<dataset>/<family>.yaml --trainer.strategy ddp
--trainer.devices 2``, shrunk to seconds; Lightning's "ddp" strategy relaunches this script once per extra rank and
later fits reuse the processes. For each run every rank saves to OUT/<run>_rank<r>.pt the batches (and labels) it
saw, the first normal draws its RNG would hand the model at every step, and its weights at the start and the end.

Usage: python newfam_ddp_probe.py OUT STEPS [RUN ...]   (all runs by default)
"""

import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_TARFLOW = ["--model.init_args.network.width", "16", "--model.init_args.network.blocks", "2",
                "--model.init_args.network.layers", "1"]
TINY_UNET = ["--model.init_args.backbone.base_channels", "8", "--model.init_args.backbone.channel_mults", "[1, 2]"]
CONDITIONAL = ["--data.conditional", "true"]
# run -> (config, overrides that keep it to seconds on CPU)
RUNS = {
    "tarflow": ("experiments/digits/tarflow.yaml", TINY_TARFLOW),
    "meanflow": ("experiments/toy2d/meanflow.yaml", ["--model.init_args.backbone.hidden", "16"]),
    "tarflow_conditional": ("experiments/digits/tarflow.yaml", TINY_TARFLOW + CONDITIONAL),
    # guidance folded into the target: the training step also evaluates the network's own velocities
    "meanflow_conditional": ("experiments/digits/meanflow.yaml",
                             TINY_UNET + CONDITIONAL + ["--model.init_args.guidance.scale", "2.0"]),
}


class Record(L.Callback):
    """Per training batch: its examples (and labels) and the next normal draws of the (already reseeded) RNG."""

    def __init__(self, out: str):
        self.out = out
        self.images, self.labels, self.noise, self.init = [], [], [], None

    def on_fit_start(self, trainer, pl_module):
        self.init = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        self.images.append(x.detach().clone())
        if y is not None:
            self.labels.append(y.clone())
        with torch.random.fork_rng():
            self.noise.append(torch.randn(4))

    def on_train_end(self, trainer, pl_module):
        torch.save({"images": torch.stack(self.images), "noise": torch.stack(self.noise), "init": self.init,
                    "labels": torch.stack(self.labels) if self.labels else None,
                    "state_dict": pl_module.state_dict(), "world_size": trainer.world_size,
                    "global_step": trainer.global_step}, f"{self.out}_rank{trainer.global_rank}.pt")


def fit_args(run: str, out: Path, steps: int) -> list[str]:
    config, overrides = RUNS[run]
    return ["fit", "--config", str(ROOT / config), *overrides,
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(out / run), "--trainer.logger.init_args.save_dir", str(out / run),
            "--data.batch_size", "16", "--sample_grid.n", "8",
            "--trainer.callbacks+=newfam_ddp_probe.Record", "--trainer.callbacks.out", str(out / run)]


if __name__ == "__main__":
    from lightning_flows.training import build_cli

    torch.set_num_threads(1)
    for name in sys.argv[3:] or RUNS:
        build_cli(fit_args(name, Path(sys.argv[1]), int(sys.argv[2])))
