"""Run by tests/test_ddp.py (the seven families) and tests/test_newfam_ddp.py (TarFlow and MeanFlow, unconditional and
class-conditional): each run's committed config, a few steps on 2 CPU ranks (gloo) under DDP.

Each family is one ``lightning-flows fit --config experiments/<dataset>/<family>.yaml --trainer.strategy ddp
--trainer.devices 2`` (the CLI's own defaults included), shrunk to a few steps. Lightning's "ddp" strategy
relaunches this script once per extra rank, exactly as it would for a user's script; later fits in the
same script reuse the processes. For each family every rank saves to OUT/<family>_rank<r>.pt (the
:class:`Record` callback) the batches it saw, the first normal draws its RNG would hand the model at every
step (that step's noise), its weights when training started and when it ended (and the labels of a
conditional run).

Usage: python ddp_probe.py OUT STEPS [RUN ...]   (the seven families by default; any name of RUNS)
"""

import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]

# family -> (config, overrides that keep it to seconds on CPU). The GAN is the failing case:
# the conv DCGAN of experiments/digits/gan.yaml (batch norm, spectral norm); R1 is added on top.
FAMILIES = {
    "vae": ("experiments/toy2d/vae.yaml", ["--model.init_args.hidden", "16"]),
    "gan": ("experiments/digits/gan.yaml", ["--model.init_args.base_channels", "8",
                                            "--model.init_args.r1_gamma", "1.0"]),
    "realnvp": ("experiments/toy2d/realnvp.yaml", ["--model.init_args.hidden", "16"]),
    "glow": ("experiments/digits/glow.yaml", ["--model.init_args.hidden", "8", "--model.init_args.steps", "1"]),
    "cnf": ("experiments/toy2d/cnf.yaml", ["--model.init_args.hidden", "16",
                                          "--model.init_args.sampler.method", "euler",
                                          "--model.init_args.sampler.steps", "4"]),
    # the MLP field's dropout: masks drawn per rank from its own RNG, the replicas still identical
    "cnf_dropout": ("experiments/toy2d/cnf.yaml", ["--model.init_args.hidden", "16", "--model.init_args.dropout", "0.2",
                                                  "--model.init_args.sampler.method", "euler",
                                                  "--model.init_args.sampler.steps", "4"]),
    "diffusion": ("experiments/toy2d/diffusion.yaml", ["--model.init_args.hidden", "16",
                                                      "--model.init_args.num_steps", "50"]),
    "flow_matching": ("experiments/toy2d/flow_matching.yaml", ["--model.init_args.hidden", "16"]),
}

TINY_TARFLOW = ["--model.init_args.network.width", "16", "--model.init_args.network.blocks", "2",
                "--model.init_args.network.layers", "1"]
TINY_UNET = ["--model.init_args.backbone.base_channels", "8", "--model.init_args.backbone.channel_mults", "[1, 2]"]
CONDITIONAL = ["--data.conditional", "true"]
# The two families beyond the lecture, with batches of 16 (their transformer / UNet steps are the slow ones).
NEW_FAMILIES = {
    "tarflow": ("experiments/digits/tarflow.yaml", TINY_TARFLOW),
    "meanflow": ("experiments/toy2d/meanflow.yaml", ["--model.init_args.backbone.hidden", "16"]),
    "tarflow_conditional": ("experiments/digits/tarflow.yaml", TINY_TARFLOW + CONDITIONAL),
    # guidance folded into the target: the training step also evaluates the network's own velocities
    "meanflow_conditional": ("experiments/digits/meanflow.yaml",
                             TINY_UNET + CONDITIONAL + ["--model.init_args.guidance.scale", "2.0"]),
}
RUNS = {**FAMILIES, **NEW_FAMILIES}


class Record(L.Callback):
    """Per training batch: its examples (and labels) and the next normal draws of the (already reseeded) RNG."""

    def __init__(self, out: str):
        self.out = out
        self.batches, self.labels, self.noise, self.init = [], [], [], None

    def on_fit_start(self, trainer, pl_module):
        self.init = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        self.batches.append(x.detach().clone())
        if y is not None:
            self.labels.append(y.clone())
        with torch.random.fork_rng():
            self.noise.append(torch.randn(4))

    def on_train_end(self, trainer, pl_module):
        torch.save({"batches": torch.stack(self.batches), "noise": torch.stack(self.noise), "init": self.init,
                    "labels": torch.stack(self.labels) if self.labels else None,
                    "state_dict": pl_module.state_dict(), "world_size": trainer.world_size,
                    "global_step": trainer.global_step}, f"{self.out}_rank{trainer.global_rank}.pt")


def fit_args(run: str, out: Path, steps: int) -> list[str]:
    config, overrides = RUNS[run]
    # GAN: one batch is two optimizer steps.
    max_steps = 2 * steps if run == "gan" else steps
    return ["fit", "--config", str(ROOT / config), *overrides,
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(out / run), "--trainer.logger.init_args.save_dir", str(out / run),
            "--data.batch_size", "16" if run in NEW_FAMILIES else "32",
            "--sample_grid.n", "8" if run in NEW_FAMILIES else "16",
            "--trainer.callbacks+=ddp_probe.Record", "--trainer.callbacks.out", str(out / run)]


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together
    from lightning_flows.training import build_cli

    torch.set_num_threads(1)
    for name in sys.argv[3:] or FAMILIES:
        build_cli(fit_args(name, Path(sys.argv[1]), int(sys.argv[2])))
    end_distributed()
