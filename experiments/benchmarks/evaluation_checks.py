"""The measurements behind the evaluator's choices in issue 20, each a subcommand printing JSON.

    python experiments/benchmarks/evaluation_checks.py floor       # FID floor of seen vs unseen images (digits)
    python experiments/benchmarks/evaluation_checks.py ring        # a ring vs the true 8-Gaussian mixture
    python experiments/benchmarks/evaluation_checks.py iw CKPT...  # bits/dim at K = 1 and K = 8, and its seconds
    python experiments/benchmarks/evaluation_checks.py hutchinson CKPT   # a CNF: IW-8, exact vs Hutchinson trace
    python experiments/benchmarks/evaluation_checks.py classifier  # fingerprints of the digits classifier per CPU ISA
    python experiments/benchmarks/evaluation_checks.py spread OUT  # quick digits runs in this process's threads/ISA
    python experiments/benchmarks/evaluation_checks.py toy RESULTS # a benchmark's 8-Gaussian runs: the 2D metrics
    python experiments/benchmarks/evaluation_checks.py compare A B  # two benchmarks' results.json, run by run
    python experiments/benchmarks/evaluation_checks.py null        # how many real-vs-real draws the 2D null needs

* ``floor``: a classifier trained (the shipped recipe) on a random half of the digits training split; the FID of
  500 digits it trained on and of 500 it never saw, each against the 180 test digits (why the floor's images are
  held out of the classifier's training).
* ``ring``: the evaluator's 2D metrics and nulls for 2,000 samples of the true mixture and of a ring of the modes'
  radius as wide as one mode (what flow matching's and diffusion's quick-suite samples look like).
* ``iw``: for checkpoints (e.g. ``outputs/benchmark/runs/digits__*__seed0/checkpoints/last.ckpt``), the likelihood
  at ``iw_samples`` 1 and 8 with their wall and CPU seconds at one thread (the cost of the importance-weighted
  estimate).
* ``hutchinson``: one CNF checkpoint scored with the exact trace and with Hutchinson's, at K = 1 and 8.
* ``classifier``: run under ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` to see training depend on the CPU's vector
  instructions (it trains the digits classifier and prints its fingerprint beside the shipped one).
* ``toy``: from a benchmark's ``results.json`` (default ``outputs/benchmark/results.json``, what ``make benchmark``
  writes), every 8-Gaussian run's 2D metrics with their distance to the null in null stds, to set beside the
  montage (which models draw a ring).
* ``compare``: two ``results.json`` of the same suite (e.g. ``--jobs 2`` against ``--jobs 1``: 1 against 2 torch
  threads per run, or two machines): how many of the numbers shared by runs of equal key are identical, and per
  metric the largest difference relative to the seed spread of the first (|a - b| / |seed 0 - seed 1|).
* ``null``: 600 real sets of 2,000 points of each toy density (the evaluator's own null draws, ``null_draws``: 600)
  scored against the reference like samples: each metric's mean and std over all 600, and the std over each block of
  20 and of 200 consecutive draws (the former and the current ``null_draws``), to show how far a block's std
  wanders from the 600's.
* ``spread``: trains realnvp, vae and gan on digits at the quick budget (seed 0) and evaluates them with the suite's
  spec; run it at other thread counts (``--threads``) or ISAs and compare the JSON files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def floor_check(trials: int = 8) -> dict:
    from lightning_flows.metrics import frechet_distance
    from lightning_flows.metrics.classifier import FeatureClassifier, classifier_data
    from lightning_flows.data.registry import load_dataset

    torch.set_num_threads(1)
    splits = load_dataset("digits", 0)
    train, labels = splits.train.float() / 16, splits.train_labels
    test = classifier_data("digits").test[0]
    out = {}
    for seed in range(trials):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(100 + seed))
        seen, unseen = order[: len(order) // 2], order[len(order) // 2:]
        torch.manual_seed(seed)
        model = FeatureClassifier(1, 10)
        optimiser = torch.optim.Adam(model.parameters(), 1e-3)
        batches = torch.Generator().manual_seed(seed)
        for _ in range(30):
            for idx in seen[torch.randperm(len(seen), generator=batches)].split(64):
                loss = torch.nn.functional.cross_entropy(model(train[idx]), labels[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.no_grad():
            reference = model.features(test).double()
            out[f"classifier_seed{seed}"] = {
                "fid_seen_500": frechet_distance(reference, model.features(train[seen[:500]]).double()),
                "fid_unseen_500": frechet_distance(reference, model.features(train[unseen[:500]]).double())}
    for key in ("fid_seen_500", "fid_unseen_500"):
        out[f"mean_{key}"] = sum(row[key] for row in list(out.values())[:trials]) / trials
    return out


def ring_check() -> dict:
    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.data.toy2d import TOY_MODES, sample_8gaussians
    from lightning_flows.evaluation import EvaluationSpec, Evaluator
    from lightning_flows.models.base import GenerativeModel

    radius, width = 4 / math.sqrt(2), TOY_MODES["8gaussians"][1]

    class Draw(GenerativeModel):
        def __init__(self, draw):
            super().__init__((2,))
            self.draw, self.anchor = draw, torch.nn.Parameter(torch.zeros(()))

        def sample(self, n):
            return self.draw(n)

    def ring(n):
        angle, r = torch.rand(n) * 2 * math.pi, radius + width * torch.randn(n)
        return torch.stack([angle.cos(), angle.sin()], 1) * r[:, None]

    dm = GenerativeDataModule("8gaussians")
    spec = EvaluationSpec(n_samples=2000, likelihood=False, timing=False, progress=False)
    keys = ("energy_distance", "mmd", "ce_gap_nats", "precision", "recall", "modes_hit", "good_fraction")
    out = {}
    for name, draw in (("true mixture", lambda n: sample_8gaussians(n, torch.default_generator)), ("ring", ring)):
        result = Evaluator(spec).evaluate(Draw(draw), dm, run_seed=0)
        out[name] = {key: result[key] for key in keys}
        for key in ("energy_distance", "mmd", "ce_gap_nats"):
            mean, std = result[f"{key}_null_mean"], result[f"{key}_null_std"]
            out[name][f"{key}_null_sigmas"] = (result[key] - mean) / std
    return out


def _likelihood(model, dm, **spec) -> tuple[dict, float, float]:
    """The bits/dim numbers of one likelihood evaluation, its wall seconds and this process's CPU seconds (all
    threads; less sensitive than wall time to other jobs on a shared machine)."""
    from lightning_flows.evaluation import EvaluationSpec, Evaluator

    start, cpu = time.perf_counter(), time.process_time()
    result = Evaluator(EvaluationSpec(quality=False, timing=False, progress=False, **spec)).evaluate(model, dm)
    return ({k: v for k, v in result.items() if k.startswith("bpd")}, time.perf_counter() - start,
            time.process_time() - cpu)


def iw_check(checkpoints: list[str]) -> dict:
    from lightning_flows.checkpoints import load_model_and_data

    torch.set_num_threads(1)
    out = {}
    for path in checkpoints:
        model, dm = load_model_and_data(path)
        row = {}
        for k in (1, 8):
            row[f"k{k}"], row[f"seconds_k{k}"], row[f"cpu_seconds_k{k}"] = _likelihood(model, dm, iw_samples=k)
        out[path] = row
    return out


def hutchinson_check(checkpoint: str) -> dict:
    from lightning_flows.checkpoints import load_model_and_data

    model, dm = load_model_and_data(checkpoint)
    out = {}
    for divergence in ("exact", "hutchinson"):
        model.test_divergence = divergence
        for k in (1, 8):
            out[f"{divergence}_k{k}"], _, _ = _likelihood(model, dm, iw_samples=k, iw_estimates=True)
    return out


def classifier_check() -> dict:
    from lightning_flows.metrics.classifier import SHIPPED, state_fingerprint, train_classifier

    model, accuracy = train_classifier("digits", log=lambda message: None)
    return {"ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"),
            "fingerprint": state_fingerprint(model), "shipped": SHIPPED["digits"][2], "test_accuracy": accuracy}


def spread_check(out: Path, threads: int) -> dict:
    from lightning_flows.benchmark.runner import run_arguments
    from lightning_flows.benchmark.suite import load_suite
    from lightning_flows.evaluation import Evaluator, sampling_weights
    from lightning_flows.training import build_cli

    torch.set_num_threads(threads)
    suite = load_suite(ROOT / "experiments" / "suites" / "quick.yaml", ROOT)
    keys = ("bpd_exact", "bpd_bound", "bpd_iw_exact", "fid", "kid", "precision", "recall", "fid_floor", "extractor")
    rows = {"threads": threads, "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(unset)")}
    for plan in suite.runs:
        if plan.dataset == "digits" and plan.seed == 0 and plan.model in ("realnvp", "vae", "gan"):
            cli = build_cli(run_arguments(plan, suite, out, ["--trainer.enable_progress_bar", "false"], "csv"))
            with sampling_weights(cli.trainer, cli.model):
                spec = dataclasses.replace(plan.evaluation, progress=False)  # stdout: the JSON alone
                result = Evaluator(spec).evaluate(cli.model, cli.datamodule, run_seed=0)
            rows[plan.model] = {k: result[k] for k in keys if k in result}
    return rows


def toy_check(results: Path) -> dict:
    """Per 8-Gaussian run of a benchmark's ``results.json``: the 2D sample-quality metrics, and how many null
    stds each lies from its real-vs-real null mean."""
    keys = ("energy_distance", "mmd", "ce_gap_nats", "precision", "recall", "modes_hit", "good_fraction",
            "nll_gap_exact", "nll_gap_bound")
    rows = {}
    for run in json.loads(results.read_text())["runs"]:
        if run["dataset"] != "8gaussians":
            continue
        row = {k: run[k] for k in keys if k in run}
        for key in ("energy_distance", "mmd", "ce_gap_nats"):
            if f"{key}_null_std" in run:
                row[f"{key}_null_sigmas"] = (run[key] - run[f"{key}_null_mean"]) / run[f"{key}_null_std"]
        rows[f"{run['model']}/seed{run['seed']}"] = row
    return rows


def null_check(draws: int = 600, n: int = 2000) -> dict:
    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.evaluation.point_quality import _null_sets, distribution_metrics, mean_and_std, point_reference

    torch.set_num_threads(2)
    out = {}
    for dataset in ("8gaussians", "checkerboard"):
        dm = GenerativeDataModule(dataset)
        ref = point_reference(dm, "test", "train", n, 2)  # the reference, bandwidth and density (no cache)
        values: dict[str, list[float]] = {}
        for points in _null_sets(dm, "train", n, draws)[0]:
            for metric, value in distribution_metrics(points, ref).items():
                values.setdefault(metric, []).append(value)
        out[dataset] = {}
        for metric, v in values.items():
            mean, std = mean_and_std(v)
            if std == 0:
                continue  # the CE gap of the checkerboard: 0 for every real point
            entry = {"mean": mean, "std": std}
            for block in (20, 200):
                stds = sorted(mean_and_std(v[i:i + block])[1] for i in range(0, draws - block + 1, block))
                entry[f"std_of_{block}"] = {"first": mean_and_std(v[:block])[1], "min": stds[0],
                                            "median": stds[len(stds) // 2], "max": stds[-1], "blocks": len(stds)}
            out[dataset][metric] = entry
    return out


COMPARED = ("bpd_discrete", "nll_gap_exact", "nll_gap_bound", "fid", "precision", "recall", "energy_distance",
            "ce_gap_nats", "fid_floor", "energy_distance_null_mean")


def compare_check(first: Path, second: Path) -> dict:
    """Runs of equal key in both files: identical numbers, and the headline metrics' differences."""
    def load(path: Path) -> dict:
        return {(r["dataset"], r["model"], r["seed"]): r for r in json.loads(path.read_text())["runs"]}

    a, b = load(first), load(second)
    shared = [k for k in a if k in b and a[k].get("key") == b[k].get("key")]
    numbers = identical = 0
    worst: dict[str, dict] = {}
    for run in shared:
        for key, value in a[run].items():
            other = b[run].get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(other, (int, float)):
                continue
            timing = key.endswith(("seconds", "per_second", "ms_per_sample", "finished_at"))
            if timing or key in ("torch_threads", "threads", "seed"):
                continue  # timings and settings differ by construction
            numbers, identical = numbers + 1, identical + (value == other)
            if key in COMPARED:
                dataset, model, _ = run
                seeds = [a.get((dataset, model, s), {}).get(key) for s in (0, 1)]
                spread = abs(seeds[0] - seeds[1]) if None not in seeds else float("nan")
                diff = abs(value - other)
                name = f"{dataset}/{key}"
                if diff > worst.get(name, {}).get("difference", -1.0):
                    worst[name] = {"difference": diff, "run": f"{model}/seed{run[2]}", "seed_spread": spread,
                                   "relative_to_seed_spread": diff / spread if spread else float("nan")}
    return {"runs_compared": len(shared), "numbers": numbers, "identical": identical, "largest": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("floor", "ring", "iw", "hutchinson", "classifier", "spread", "toy",
                                                         "compare", "null"))
    parser.add_argument("paths", nargs="*", help="checkpoints (iw, hutchinson), the output folder (spread) or a "
                                                  "benchmark's results.json (toy)")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    if opts.check == "floor":
        result = floor_check()
    elif opts.check == "ring":
        result = ring_check()
    elif opts.check == "iw":
        result = iw_check(opts.paths)
    elif opts.check == "hutchinson":
        result = hutchinson_check(opts.paths[0])
    elif opts.check == "classifier":
        result = classifier_check()
    elif opts.check == "compare":
        result = compare_check(Path(opts.paths[0]), Path(opts.paths[1]))
    elif opts.check == "null":
        result = null_check()
    elif opts.check == "toy":
        result = toy_check(Path(opts.paths[0] if opts.paths else "outputs/benchmark/results.json"))
    else:
        result = spread_check(Path(opts.paths[0] if opts.paths else "outputs/evaluation_checks"), opts.threads)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
