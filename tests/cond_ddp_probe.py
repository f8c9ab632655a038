"""Run by tests/test_conditional_ddp.py: class-conditional models for a few batches on 2 CPU ranks (gloo) under DDP,
on labelled ``(x, y)`` batches: a conv GAN (projection discriminator, spectral norm, batch norm, R1), multi-scale
RealNVP, Glow and NSF (the label in every coupling network and a per-class base, ActNorm), a conv CVAE and a CNF with
the MLP field, the conv field and their sum, the digits config's ``conv_mlp`` (the label in every layer of its field, a
per-class base, Hutchinson training with RNODE penalties).

Each run uses the callbacks the CLI adds to every fit (per-rank step seeds, buffers synced at the end); Lightning's
"ddp" strategy relaunches this script once per extra rank and later fits reuse the processes. For each family every
rank saves to OUT/<family>_rank<r>.pt the batches (images and labels) it saw, the first normal draws its RNG would
hand the model at every step, its weights when training started and when it ended, and (CNFs) the exact likelihood
of its share of the first examples.

Usage: python cond_ddp_probe.py OUT STEPS [FAMILY ...]   (all families by default)
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_flows.callbacks import DistributedReplicas, PerStepSeed
from lightning_flows.models import CNF, GAN, NSF, VAE, Glow, RealNVP

CLASSES = 10
LIKELIHOOD_EXAMPLES = 6  # the CNFs' exact log p(x | y) on the first examples, split between the ranks
FAMILIES = {
    "cnf": lambda: CNF((1, 8, 8), field="mlp", hidden=8, depth=1, normalize=True, train_divergence="hutchinson",
                       train_solver={"method": "rk4", "steps": 2}, kinetic_weight=0.01, jacobian_weight=0.01,
                       num_classes=CLASSES),
    # The digits config's field: the label shifts every channel of every conv layer; generic Hutchinson trace.
    "cnf_conv": lambda: CNF((1, 8, 8), field="conv", channels=4, depth=1, normalize=True,
                            train_divergence="hutchinson", train_solver={"method": "rk4", "steps": 2},
                            kinetic_weight=0.01, jacobian_weight=0.01, num_classes=CLASSES),
    # The digits config's field (conv + MLP): the exact trace is the conv part's coloured passes plus the MLP's closed
    # form.
    "cnf_conv_mlp": lambda: CNF((1, 8, 8), field="conv_mlp", channels=4, hidden=8, depth=1, normalize=True,
                                train_divergence="hutchinson", train_solver={"method": "rk4", "steps": 2},
                                kinetic_weight=0.01, jacobian_weight=0.01, num_classes=CLASSES),
    "gan": lambda: GAN((1, 8, 8), network="conv", base_channels=8, latent_dim=8, spectral_norm=True, r1_gamma=1.0,
                       num_classes=CLASSES),
    "glow": lambda: Glow((1, 8, 8), levels=2, steps=1, hidden=8, num_classes=CLASSES),
    "nsf": lambda: NSF((1, 8, 8), levels=2, steps=1, hidden=8, spline_bins=4, num_classes=CLASSES),
    "realnvp": lambda: RealNVP((1, 8, 8), levels=2, steps=1, hidden=8, num_classes=CLASSES),
    "vae": lambda: VAE((1, 8, 8), network="conv", base_channels=8, latent_dim=4, num_classes=CLASSES),
}


class Record(L.Callback):
    def __init__(self):
        self.images, self.labels, self.noise, self.init = [], [], [], None

    def on_fit_start(self, trainer, pl_module):
        self.init = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.images.append(x.clone())
        self.labels.append(y.clone())
        with torch.random.fork_rng():
            self.noise.append(torch.randn(4))


def main(family: str, out: Path, steps: int) -> None:
    L.seed_everything(0)
    data = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1, 8, 8, generator=data) * 2 - 1
    y = torch.randint(CLASSES, (256,), generator=data)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = FAMILIES[family]()
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=model.optimizer_steps_per_batch * steps,
                        logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PerStepSeed(), DistributedReplicas(), record])
    trainer.fit(model, loader)
    extra = {}
    if isinstance(model, CNF):  # each rank's share of the exact likelihood (the conv field: its coloured trace)
        model.eval()
        share = slice(trainer.global_rank, LIKELIHOOD_EXAMPLES, trainer.world_size)
        with torch.no_grad():
            extra["exact_log_prob"] = model.log_prob(x[share], y[share])
    torch.save({"images": torch.stack(record.images), "labels": torch.stack(record.labels),
                "noise": torch.stack(record.noise), "init": record.init, "state_dict": model.state_dict(),
                "world_size": trainer.world_size, "global_step": trainer.global_step, **extra},
               out / f"{family}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together

    torch.set_num_threads(1)
    for name in sys.argv[3:] or FAMILIES:
        main(name, Path(sys.argv[1]), int(sys.argv[2]))
    end_distributed()
