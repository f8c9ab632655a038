"""RealNVP and Glow on FFJORD's 8 Gaussians: exact test NLL minus the true entropy, 90 s each.

    python experiments/benchmarks/flows_toy2d.py [--seconds 90] [--dataset 8gaussians]

The gap ``NLL - H`` (nats) is comparable with the peers' column in ANCHORS.md (zuko NSF +0.016,
zuko RealNVP +0.094, normflows RealNVP +0.127 on 8gaussians, same 90 s / batch 512 / Adam 1e-3).
Models are built from the committed configs experiments/toy2d/<family>.yaml.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from lightning_flows.callbacks import NonFiniteGuard  # noqa: E402
from lightning_flows.data import GenerativeDataModule  # noqa: E402
from lightning_flows.models import Glow, RealNVP  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "toy2d"
FAMILIES = {"realnvp": RealNVP, "glow": Glow}


def run(family: str, dataset: str, seconds: float, seed: int) -> dict:
    config = yaml.safe_load((CONFIGS / f"{family}.yaml").read_text())
    L.seed_everything(seed)
    datamodule = GenerativeDataModule(**{**config["data"], "dataset": dataset, "seed": seed})
    model = FAMILIES[family](data_shape=datamodule.data_shape, **config["model"]["init_args"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_time={"seconds": seconds}, max_epochs=100_000,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=config["trainer"].get("gradient_clip_val"),
                        callbacks=[NonFiniteGuard(max_consecutive=20)])
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    elapsed = time.perf_counter() - start
    test = datamodule.split("test")
    model.eval()
    with torch.no_grad():
        nll = -model.log_prob(test).mean().item()
    entropy = -datamodule.true_log_density(test).mean().item()
    return {"family": family, "steps": trainer.global_step, "seconds": elapsed, "nll": nll, "entropy": entropy,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--dataset", default="8gaussians", choices=["8gaussians", "checkerboard"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    opts = parser.parse_args()
    torch.set_num_threads(1)  # two threads per process thrash on the shared 2-core machine
    rows = [run(f, opts.dataset, opts.seconds, opts.seed) for f in opts.families]
    print(f"\n{opts.dataset}, test split (5,000 points), {opts.seconds:.0f} s training per family, seed {opts.seed}")
    print("| family | params | steps | steps/s | test NLL | true H (test) | gap (nats) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['params']:,} | {r['steps']} | {r['steps'] / r['seconds']:.0f} | "
              f"{r['nll']:.3f} | {r['entropy']:.3f} | {r['nll'] - r['entropy']:+.3f} |")


if __name__ == "__main__":
    main()
