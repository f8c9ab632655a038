"""Run a benchmark suite: train each configured model through the CLI, evaluate it, write the table.

A suite is a YAML file::

    name: quick
    n_samples: 2000            # samples drawn per run for sample-quality and timing figures
    seeds: [0]
    runs:
      - name: flow_matching/8gaussians
        config: experiments/toy2d/flow_matching.yaml
        args: {trainer.max_steps: 3000}      # any `lightning-flows fit` override

Every run is trained with the same CLI a user types, so the table is reproducible by hand.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from lightning_flows.benchmark.evaluate import evaluate
from lightning_flows.benchmark.table import write_results
from lightning_flows.plotting import save_sample_figure
from lightning_flows.training import build_cli


def _fit_args(run: dict, seed: int, out_dir: Path) -> list[str]:
    slug = run["name"].replace("/", "_")
    args = ["fit", "--config", run["config"], "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(out_dir / "runs" / slug),
            "--trainer.logger.init_args.save_dir", str(out_dir / "runs"),
            "--trainer.logger.init_args.name", f"{slug}_seed{seed}",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    for key, value in (run.get("args") or {}).items():
        args += [f"--{key}", str(value)]
    return args


def run_one(run: dict, seed: int, out_dir: Path, n_samples: int) -> dict:
    print(f"[benchmark] {run['name']} seed {seed}: training ({run['config']})", flush=True)
    start = time.perf_counter()
    cli = build_cli(_fit_args(run, seed, out_dir))
    train_seconds = time.perf_counter() - start
    model, dm = cli.model, cli.datamodule
    figures, samples = evaluate(model, dm, n_samples=n_samples, seed=seed,
                                max_nll_examples=run.get("max_nll_examples"))
    picture = out_dir / "samples" / f"{run['name'].replace('/', '_')}_seed{seed}.png"
    reference = dm.split("test")[:n_samples] if samples.ndim == 2 else None
    shown = samples if samples.ndim == 2 else samples[:64]
    save_sample_figure(dm.to_pixels(shown.cpu()), picture, title=run["name"], reference=reference)
    row = {"run": run["name"], "seed": seed, "family": type(model).__name__, "dataset": dm.dataset,
           "params": sum(p.numel() for p in model.parameters()), "train_steps": cli.trainer.global_step,
           "train_seconds": train_seconds, **figures, "samples_png": str(picture.relative_to(out_dir))}
    print(f"[benchmark] {run['name']} seed {seed}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()), flush=True)
    return row


def run_suite(suite_path: str | Path, out_dir: str | Path, only: list[str] | None = None) -> Path:
    suite = yaml.safe_load(Path(suite_path).read_text())
    out = Path(out_dir)
    rows = []
    for run in suite["runs"]:
        if only and run["name"] not in only:
            continue
        for seed in suite.get("seeds", [0]):
            rows.append(run_one(run, seed, out, suite.get("n_samples", 2000)))
    device = "cuda" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    preamble = (f"# Benchmark `{suite.get('name', Path(suite_path).stem)}`\n\n"
                f"Produced by `lightning-flows benchmark --suite {suite_path} --out {out_dir}` on {device}, "
                f"torch {torch.__version__}. Test split; figures from `lightning_flows/benchmark/evaluate.py`.")
    table = write_results(rows, out, preamble)
    print(table.read_text())
    return table


def benchmark_main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="lightning-flows benchmark",
                                     description="Train and evaluate a suite of configs; write a comparison table.")
    parser.add_argument("--suite", default="experiments/suites/quick.yaml")
    parser.add_argument("--out", default="outputs/benchmark")
    parser.add_argument("--only", nargs="*", help="run only these run names")
    opts = parser.parse_args(argv)
    return run_suite(opts.suite, opts.out, opts.only)
