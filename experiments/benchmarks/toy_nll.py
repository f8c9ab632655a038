"""Every likelihood family at the peers' budget: toy2d NLL gaps beside the peers', digits bits/dim beside the
independent-pixel baseline. All numbers come from the benchmark runner and its one evaluator.

    python experiments/benchmarks/toy_nll.py [--out outputs/toy_nll] [--jobs 2] [--skip-digits]
    python experiments/benchmarks/toy_nll.py --tiny --out /tmp/toy_nll   # seconds: every stage, numbers meaningless

1. ``experiments/suites/toy_nll.yaml``: every likelihood family trained for 90 s (``max_time``) on 8gaussians
   and checkerboard from its committed toy2d config; exact test NLL on all 5,000 held-out points minus the
   true entropy (the gap; 0 is the limit). The peers' figures are ANCHORS.md's (same machine, 90 s, batch 512).
2. The digits bits/dim of every likelihood family in the quick benchmark's budget
   (``experiments/suites/quick.yaml``; finished runs of ``make benchmark`` in ``--quick-out`` are reused,
   not retrained) beside the uniform and independent-pixel baselines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

# --tiny: the same stages on one small suite (RealNVP on 8 Gaussians and on digits; a few
# steps, likelihood only on digits), written into --out instead of the committed suites.
TINY_SUITE = """\
name: toy_nll_tiny
description: toy_nll.py --tiny, every stage in seconds; the numbers mean nothing.
seeds: [0]
models: [realnvp]
datasets:
  8gaussians:
    configs: experiments/toy2d
    steps: 3
    batch_size: 64
    evaluation: {n_samples: 200, max_likelihood_examples: 200, timing: false}
  digits:
    configs: experiments/digits
    steps: 3
    batch_size: 16
    evaluation: {n_samples: 20, max_likelihood_examples: 20, quality: false, timing: false}
evaluation: {sample_batch_size: 100, likelihood_batch_size: 100}
trainer: {limit_val_batches: 0, num_sanity_val_steps: 0, enable_model_summary: false}
"""

# (density, library model) -> NLL gap in nats at 90 s, batch 512, 2 CPU cores (ANCHORS.md, 2026-11-28).
PEERS = {
    ("8gaussians", "zuko NSF"): 0.016, ("8gaussians", "zuko RealNVP"): 0.094,
    ("8gaussians", "normflows RealNVP"): 0.127, ("8gaussians", "torchcfm CFM"): 0.053,
    ("8gaussians", "torchcfm OT-CFM"): 0.090,
    ("checkerboard", "zuko NSF"): 0.055, ("checkerboard", "zuko RealNVP"): 0.142,
    ("checkerboard", "normflows RealNVP"): 0.241, ("checkerboard", "torchcfm CFM"): 0.177,
    ("checkerboard", "torchcfm OT-CFM"): 0.460,
}
KINDS = ("exact", "estimate", "bound")


def by_model(rows: list[dict]) -> dict[str, list[dict]]:
    """``{model: its rows in seed order}``, models in name order."""
    grouped: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["model"], r["seed"])):
        grouped.setdefault(row["model"], []).append(row)
    return grouped


def per_seed(values: list[float], fmt: str) -> str:
    """Each seed's value, then (with several seeds) the spread max - min: what a rerun may move the number by."""
    text = " / ".join(fmt.format(v) for v in values)
    return text if len(values) < 2 else f"{text} (range {max(values) - min(values):.3f})"


def _gap_cells(rows: list[dict]) -> str:
    return "; ".join(f"{per_seed([r[f'nll_gap_{k}'] for r in rows], '{:+.3f}')} {k}" for k in KINDS
                     if all(f"nll_gap_{k}" in r for r in rows))


def toy_table(rows: list[dict]) -> str:
    """One row per (density, model): each seed's steps in the budget, NLL gap and energy distance (seed order)."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Seeds {', '.join(map(str, seeds))}; each cell lists the seeds' values in that order.", "",
             "| density | model | steps in 90 s | test NLL gap, nats | energy dist. (floor) |", "|---|---|---|---|---|"]
    for density in ("8gaussians", "checkerboard"):
        for model, runs in by_model([r for r in rows if r["dataset"] == density]).items():
            ed = "-"
            if all("energy_distance" in r for r in runs):
                ed = (" / ".join(f"{r['energy_distance']:.4f}" for r in runs)
                      + f" ({runs[0]['energy_distance_floor']:.4f})")
            steps = " / ".join(f"{r['global_step']:,}" for r in runs)
            lines.append(f"| {density} | ours: {model} | {steps} | {_gap_cells(runs)} | {ed} |")
        for (d, peer), gap in PEERS.items():
            if d == density:
                lines.append(f"| {density} | peer: {peer} (ANCHORS.md) | - | {gap:+.3f} exact | - |")
    return "\n".join(lines) + "\n"


def digits_table(rows: list[dict], baselines: dict[str, float]) -> str:
    """The headline ``bpd_discrete`` with its label (the same quantity for every family: an upper bound on the
    discrete NLL of the 17-level digits), each seed's value in seed order."""
    lines = ["| model | test bits/dim (each seed) | what it is |", "|---|---|---|"]
    for model, runs in by_model(rows).items():
        if all("bpd_discrete" in r for r in runs):
            lines.append(f"| {model} | {per_seed([r['bpd_discrete'] for r in runs], '{:.3f}')} | "
                         f"{runs[0]['likelihood_label_discrete']} |")
    lines += [f"| baseline: {name} | {value:.3f} | exact |" for name, value in baselines.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from lightning_flows.benchmark.report import reference_likelihoods
    from lightning_flows.benchmark.runner import run_suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/toy_nll")
    parser.add_argument("--quick-out", default="outputs/benchmark", help="where `make benchmark` wrote its runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each on 2 cores)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="every stage on a tiny suite written into --out")
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    toy_suite = ROOT / "experiments" / "suites" / "toy_nll.yaml"
    quick_suite, quick_out = ROOT / "experiments" / "suites" / "quick.yaml", opts.quick_out
    if opts.tiny:
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        toy_suite = quick_suite = Path(opts.out) / "tiny_suite.yaml"
        toy_suite.write_text(TINY_SUITE)
        quick_out = opts.out
    run_suite(toy_suite, opts.out, only=["8gaussians"] if opts.tiny else None, jobs=opts.jobs, root=ROOT)
    toy = [r for r in json.loads((Path(opts.out) / "results.json").read_text())["runs"]
           if r["dataset"] in ("8gaussians", "checkerboard")]
    report = ["## Toy densities: exact test NLL minus the true entropy at 90 s of training", "", toy_table(toy)]
    if not opts.skip_digits:
        likelihood_models = ["vae", "realnvp", "glow", "nsf", "cnf", "diffusion", "flow_matching"]
        run_suite(quick_suite, quick_out, only=["digits"], jobs=opts.jobs, root=ROOT)
        quick = json.loads((Path(quick_out) / "results.json").read_text())["runs"]
        digits = [r for r in quick if r["dataset"] == "digits" and r["model"] in likelihood_models]
        report += ["## digits: test bits/dim in the quick budget", "",
                   digits_table(digits, reference_likelihoods("digits"))]
    report.append(f"Wall time {time.perf_counter() - start:.0f} s.")
    text = "\n".join(report)
    (Path(opts.out) / "toy_nll.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
