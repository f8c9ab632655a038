"""Train VAE, GAN and DDPM on 8x8 digits for a fixed wall-clock budget each; print bits/dim and sampling cost.

    python experiments/benchmarks/families_digits.py [--seconds 60] [--out outputs/families_digits]

Each family is built from its config ``experiments/digits/<family>.yaml`` (model arguments and EMA
decay), trained for ``--seconds`` on the CPU, then evaluated with the EMA weights where the config
uses them: test bits/dim through the shared ``dm.bits_per_dim`` (VAE: IWAE bound with K=64;
diffusion: DDPM's variational bound, Monte Carlo over timesteps; GAN: none), NFE and milliseconds
per sample (32 samples per call), and a sample grid per family in ``--out``. All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

from lightning_flows.callbacks import EMACallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GAN, VAE, Diffusion
from lightning_flows.plotting import save_sample_figure

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {"vae": VAE, "gan": GAN, "diffusion": Diffusion}


def load_config(family: str) -> tuple[dict, float | None]:
    config = yaml.safe_load((ROOT / "experiments" / "digits" / f"{family}.yaml").read_text())
    ema = [c for c in config.get("trainer", {}).get("callbacks", []) or [] if c["class_path"].endswith("EMACallback")]
    return config["model"]["init_args"], (ema[0]["init_args"]["decay"] if ema else None)


@torch.no_grad()
def test_bits_per_dim(model, dm: GenerativeDataModule) -> float | None:
    if model.likelihood == "none":
        return None
    test = dm.split("test")
    nll = torch.cat([-model.log_prob(batch) for batch in test.split(256)])
    return float(dm.bits_per_dim(nll).mean())


@torch.no_grad()
def sampling_cost(model, n: int = 32, **kwargs) -> tuple[torch.Tensor, int, float]:
    start = time.perf_counter()
    samples = model.sample(n, **kwargs)
    return samples, model.last_sample_nfe, 1000 * (time.perf_counter() - start) / n


def run_family(family: str, seconds: float, out: Path) -> list[dict]:
    torch.manual_seed(0)
    model_args, ema_decay = load_config(family)
    dm = GenerativeDataModule("digits", batch_size=128)
    model = FAMILIES[family](data_shape=dm.data_shape, **model_args)
    ema = EMACallback(decay=ema_decay) if ema_decay else None
    trainer = L.Trainer(max_time={"seconds": seconds}, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[ema] if ema else [])
    start = time.perf_counter()
    trainer.fit(model, dm)
    train_s = time.perf_counter() - start
    if ema:
        ema.swap_in(model)  # evaluate and sample with the averaged weights, as validation does
    model.eval()
    torch.manual_seed(1)
    bpd = test_bits_per_dim(model, dm)
    rows = []
    variants = [{}] if family != "diffusion" else [{"sampler": "ddim", "steps": 100}, {"sampler": "ancestral"}]
    for kwargs in variants:
        samples, nfe, ms = sampling_cost(model, **kwargs)
        name = family if not kwargs else f"{family} ({kwargs['sampler']})"
        suffix = "_" + kwargs["sampler"] if kwargs else ""
        path = save_sample_figure(dm.to_pixels(samples), out / f"{family}{suffix}.png",
                                  title=name)
        rows.append({"family": name, "batches": trainer.fit_loop.epoch_loop._batches_that_stepped,
                     "train_s": train_s, "bpd": bpd, "nfe": nfe, "ms_per_sample": ms, "grid": path})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall-clock per family")
    parser.add_argument("--out", default="outputs/families_digits", help="where the sample grids go")
    opts = parser.parse_args()
    out = Path(opts.out)
    rows = [row for family in FAMILIES for row in run_family(family, opts.seconds, out)]

    print(f"\n8x8 digits, {opts.seconds:.0f} s of CPU training per family, test split, one seed")
    print(f"{'family':<24}{'batches':>8}{'test bpd':>10}{'NFE':>6}{'ms/sample':>11}  grid")
    for r in rows:
        bpd = f"{r['bpd']:.3f}" if r["bpd"] is not None else "-"
        print(f"{r['family']:<24}{r['batches']:>8}{bpd:>10}{r['nfe']:>6}{r['ms_per_sample']:>11.2f}  {r['grid']}")
    by_name = {r["family"]: r for r in rows}
    ddim, ancestral = by_name["diffusion (ddim)"], by_name["diffusion (ancestral)"]
    print(f"sampling time ratio, DDPM ancestral / DDIM-100: {ancestral['ms_per_sample'] / ddim['ms_per_sample']:.1f}x; "
          f"diffusion DDIM / VAE: {ddim['ms_per_sample'] / by_name['vae']['ms_per_sample']:.0f}x; "
          f"diffusion DDIM / GAN: {ddim['ms_per_sample'] / by_name['gan']['ms_per_sample']:.0f}x")
    print("bpd: VAE = IWAE bound (K=64), diffusion = DDPM variational bound; both upper bounds on the true bpd.")


if __name__ == "__main__":
    main()
