"""Test bits/dim of RealNVP, Glow and NSF on 8x8 digits within a quick CPU budget.

    python experiments/benchmarks/flows_digits.py [--seconds 120]

Each family is built from its committed config (experiments/digits/<family>.yaml), trained for a
fixed wall-clock budget with Lightning, then scored on the whole test split with the exact
``log_prob`` and the DataModule's shared bits/dim helper. The reference is the uniform model over
17 grey levels, log2(17) = 4.09 bits/dim; printed ratios are bpd / 4.09 from this one run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import lightning as L
import torch
import yaml

from lightning_flows.callbacks import NonFiniteGuard
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import NSF, Glow, RealNVP

CONFIGS = Path(__file__).resolve().parents[1] / "digits"
FAMILIES = {"realnvp": RealNVP, "glow": Glow, "nsf": NSF}


def test_bits_per_dim(model, datamodule: GenerativeDataModule) -> float:
    model.eval()
    with torch.no_grad():
        nll = torch.cat([-model.log_prob(x) for x in datamodule.split("test").split(200)])
    return float(datamodule.bits_per_dim(nll.mean()))


def run(family: str, seconds: float, seed: int) -> dict:
    config = yaml.safe_load((CONFIGS / f"{family}.yaml").read_text())
    L.seed_everything(seed)
    datamodule = GenerativeDataModule(**{**config["data"], "seed": seed})
    model = FAMILIES[family](data_shape=datamodule.data_shape, **config["model"]["init_args"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_time={"seconds": seconds}, max_epochs=10_000,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=config["trainer"].get("gradient_clip_val"),
                        callbacks=[NonFiniteGuard(max_consecutive=20)])
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    elapsed = time.perf_counter() - start
    return {"family": family, "steps": trainer.global_step, "seconds": elapsed,
            "params": sum(p.numel() for p in model.parameters()), "bpd": test_bits_per_dim(model, datamodule)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="training wall-clock per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    opts = parser.parse_args()
    # One thread: on a shared 2-core machine, two threads per process thrash (measured 17x slower steps).
    torch.set_num_threads(1)
    uniform = math.log2(17)
    rows = [run(family, opts.seconds, opts.seed) for family in opts.families]
    print(f"\ndigits 8x8 (17 levels), test split, {opts.seconds:.0f} s training per family, seed {opts.seed}")
    print(f"| family | params | steps | train s | test bpd | bpd / uniform ({uniform:.2f}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['params']:,} | {r['steps']} | {r['seconds']:.0f} | {r['bpd']:.3f} | "
              f"{r['bpd'] / uniform:.3f} |")


if __name__ == "__main__":
    main()
