"""Everything a finished (or partly finished) suite writes: table.md, table.csv, results.json, figures and
``samples/<slug>.png`` (each reported run's picture, copied from its run directory). Every file is replaced
atomically; the runner holds the report lock while this module writes (see ``store.py``)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from lightning_flows.benchmark.adopt import adopted_note
from lightning_flows.benchmark.environment import describe_device
from lightning_flows.benchmark.figures import bits_per_dim_bars, budget_curves, montage, quality_vs_cost
from lightning_flows.benchmark.store import Store, atomic_write_bytes, atomic_write_text
from lightning_flows.benchmark.suite import run_slug
from lightning_flows.benchmark.table import (CURVE_METRICS, aggregate, curve_table, dataset_table, lecture_table,
                                             spread_note)
from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import KEYS
from lightning_flows.metrics.baselines import independent_pixel_bits_per_dim

COLUMN_GUIDE = """\
How to read it:
- Every number comes from `lightning_flows.evaluation.Evaluator`, the code behind the evaluation callbacks and
  `lightning-flows test`; the weights evaluated are the ones `lightning-flows sample` uses (`weights`: EMA where
  the run kept an average). Cells with several values list each seed's value in seed order (`a / b`); with more
  than three seeds a cell is `mean ± sd`, sd the sample standard deviation. Each seed trains and draws its samples
  with its own seed.
- *steps × batch*: optimizer steps per network at that batch size (the GAN's discriminator and generator each take
  that many). *train s*: time inside training batches only (no start-up, validation, sample grids or checkpoints);
  *examples/s* = examples seen / train s.
- *NFE/sample*: network evaluations per sample; *ms/sample*: device-milliseconds per sample after a warm-up,
  drawing the same batch size for every family.
- *bits/dim* on discrete data: every headline value (*discrete NLL, upper bound*; in the lecture table the first
  number of a Likelihood cell) is an upper bound on the same quantity, the model's NLL of the integer pixel levels
  -log2 P(k) per dimension, so rows compare like with like and lower is better. *which bound* says which of the
  model's upper bounds was lowest: *discrete, IW-K bound* (a continuous density averaged over K dequantisation
  draws, Flow++'s estimate, tight as K grows), *ELBO / IWAE-K bound* (the VAE's discrete decoder), *DDPM bound*,
  *dequantised bound* (one dequantisation draw). The *1 draw* columns are each likelihood at the split's one fixed
  dequantisation draw: for a continuous density a looser bound of the same discrete NLL (*unbiased est.*:
  Hutchinson's estimate of it).
- *NLL gap* (2D): test NLL minus the data's true entropy on the same points (0 is the physical limit), labelled
  exact, unbiased est. or the bound it is (the VAE's IWAE-K, diffusion's DDPM bound).
- *FID/KID*: features of the suite's extractor on n generated samples against the reference split; the *floor*
  is another real split at the same n against the same reference. FID shrinks with n, so compare it only at equal
  n and extractor (these are not comparable with published Inception FIDs unless the extractor is Inception and n
  is 10k/50k); KID is unbiased in n. *precision/recall*: k-NN manifolds (k=3) in feature space. A VAE's FID is on
  its decoder means (sharper than its draws); *FID, true draws* scores draws from the model whose bits/dim is shown.
- 2D: *CE gap*: the samples' cross-entropy under the true density minus its entropy, in nats (precision-side: mass
  between the modes raises it; 0 for real data); *energy dist.* and *MMD²* (a Gaussian kernel at the mixture's
  own scale): unbiased statistics to held-out data, so values near zero can be negative for a model as for real
  data. *real* and *real sd*: the same statistic for fresh real sets of the same n (mean and sample sd), the noise
  floor; "within data noise" means within 2 real sd of the real mean. *modes hit*: modes receiving >= 1% of the
  samples, per seed, out of the dataset's modes; *mode KL*: KL(mode histogram || uniform).
- *posterior gap*: VAE's IWAE-K bound minus its ELBO (nats), the lecture's "posterior gap".
"""


def _env_line(suite, environment: dict, rows: Sequence[dict]) -> str:
    packages = environment["packages"]
    # The threads each run trained and was evaluated with (a benchmark worker beside others gets fewer than the
    # process that writes the report), as the runs recorded them.
    threads = sorted({int(r["torch_threads"]) for r in rows if isinstance(r.get("torch_threads"), (int, float))})
    device = describe_device()
    if threads and not torch.cuda.is_available():
        device = f"CPU ({os.cpu_count()} cores; each run {' or '.join(map(str, threads))} torch thread(s))"
    return (f"Produced by `lightning-flows benchmark --suite {suite.path}` on {device}, git "
            f"{environment['git_commit'][:12]}, torch {packages['torch']}, lightning {packages['lightning']}.")


def _real_for_montage(dm: GenerativeDataModule, n: int) -> torch.Tensor:
    data = dm.split("test")[:n]
    return dm.to_pixels(data) if dm.is_discrete else data


def _partial_note(total: int, missing: dict[str, str]) -> list[str]:
    """The paragraph naming the runs of the suite that are not in the table, grouped by why."""
    if not missing:
        return []
    by_reason: dict[str, list[str]] = {}
    for run, reason in missing.items():
        by_reason.setdefault(reason, []).append(run)
    lines = [f"**Partial: {len(missing)} of {total} runs have no result under these settings** (rerun the same "
             f"command without `--only` to finish them):"]
    lines += [f"- {reason}: {', '.join(runs)}" for reason, runs in by_reason.items()]
    return lines + [""]


def write_report(suite, rows: Sequence[dict], out: Path, environment: dict, logger: str = "csv",
                 missing: dict[str, str] | None = None) -> Path:
    """Write ``table.md``, ``table.csv``, ``results.json``, the figures and the sample pictures for the finished
    ``rows``; ``missing`` maps each run of the suite that has none to the reason (named in table.md and
    results.json)."""
    out.mkdir(parents=True, exist_ok=True)
    missing = dict(missing or {})
    entries = aggregate(rows)
    image_datasets = {d for d in suite.datasets if suite.datamodule(d).info.is_image}
    seeds = sorted({r["seed"] for r in rows})
    parts = [f"# Benchmark `{suite.name}`", "", _env_line(suite, environment, rows),
             f"{len(seeds)} seed(s) per model ({', '.join(map(str, seeds))}); {spread_note(entries)}", ""]
    if adopted_note(rows):
        parts += [adopted_note(rows), ""]
    if suite.description:
        parts += [suite.description.strip(), ""]
    parts += _partial_note(len(suite.runs), missing)
    parts += ["## The lecture's comparison, measured", "", lecture_table(entries, image_datasets)]
    for dataset in suite.datasets:
        members = [e for e in entries if e["dataset"] == dataset]
        if not members:
            continue
        spec = next(r["evaluation"] for r in rows if r["dataset"] == dataset)
        first = next(r for r in rows if r["dataset"] == dataset)
        if dataset in image_datasets:
            references = ", ".join(f"{name.split(' (')[0]} {value:.3f}"
                                   for name, value in reference_likelihoods(dataset, suite.datamodule(dataset)).items())
            detail = (f"test bits/dim needing no training: {references}. "
                      f"Sample quality: {spec['n_samples']} samples, features `{first.get('extractor', '-')}`, "
                      f"reference: {spec['reference_split']} split (n={first.get('n_reference', '-')}), floor n="
                      f"{first.get('n_floor', '-')}; bits/dim on the {first.get('likelihood_split', 'test')} split "
                      f"(n={first.get('likelihood_examples', '-')})")
        else:
            detail = (f"{spec['n_samples']} samples against {first.get('n_reference', '-')} points of the "
                      f"{spec['reference_split']} split; NLL on {first.get('likelihood_examples', '-')} test points")
        parts += [f"## {dataset}", "", detail, "", dataset_table(members, dataset in image_datasets)]
    parts += _budget_section(suite, rows, image_datasets)
    reasons = sorted({(e["model"], reason) for e in entries for reason in e.get("reasons") or []})
    if reasons:
        parts += ["## Deviations from the suite's recipe", ""] + [f"- `{m}`: {r}" for m, r in reasons] + [""]
    figures = _write_figures(suite, entries, rows, out, image_datasets)
    if figures:
        parts += ["## Figures", ""] + [f"![{name}]({path.relative_to(out)})" for name, path in figures.items()] + [""]
    parts += [COLUMN_GUIDE]
    _publish_samples(rows, out)
    table = out / "table.md"
    atomic_write_text(table, "\n".join(parts))
    _write_csv(entries, out / "table.csv")
    atomic_write_text(out / "results.json", json.dumps(
        {"suite": suite.name, "suite_file": str(suite.path), "environment": environment, "keys": KEYS,
         "runs": list(rows), "missing": missing}, indent=1, default=str) + "\n")
    if logger == "wandb":
        from lightning_flows.benchmark.tracking import log_suite_table

        log_suite_table(suite, entries, figures)
    return table


BUDGET_GUIDE = ("Each run was also evaluated during training, by the same evaluator on the same weights, at the "
                "steps below (the last is the final evaluation of the tables above; a point of the suite's "
                "`cheap_evaluate_at` measures the likelihood, and on 2D data the sample metrics, but no FID). Each "
                "cell: mean over seeds (each seed's value) at the mean training seconds there, which count no "
                "evaluation. Figures: `budget_quality.png`, `budget_likelihood.png`.")


def _budget_section(suite, rows: Sequence[dict], image_datasets: set[str]) -> list[str]:
    """Quality and likelihood at every budget point of the runs that have a curve (nothing for other suites)."""
    if not any(r.get("curve") for r in rows):
        return []
    parts = ["## Quality and likelihood against the training budget", "", BUDGET_GUIDE, ""]
    for dataset in suite.datasets:
        members = [r for r in rows if r["dataset"] == dataset and r.get("curve")]
        for metric in CURVE_METRICS:
            table = curve_table(members, dataset in image_datasets, metric)
            if table:
                parts += [f"### {dataset}: {metric}", "", table]
    return parts


def reference_likelihoods(dataset: str, dm: GenerativeDataModule | None = None) -> dict[str, float]:
    """Test bits/dim that need no training: a uniform density over the levels and independent per-pixel
    categoricals fitted on the training split (what any model of the images must beat). ``dm``: the dataset's
    DataModule when it needs arguments (a folder's image_size)."""
    dm = dm or GenerativeDataModule(dataset)
    dm.setup()
    return {f"uniform ({dataset})": math.log2(dm.levels),
            f"independent pixels ({dataset})": independent_pixel_bits_per_dim(dm.splits.train, dm.splits.test,
                                                                               dm.levels)}


def _write_figures(suite, entries, rows, out: Path, image_datasets: set[str]) -> dict[str, Path]:
    if not entries:  # nothing finished under the current configs (e.g. all edited since): no figure to draw
        return {}
    figures = {"quality vs sampling cost": quality_vs_cost(entries, image_datasets, out / "quality_vs_cost.png")}
    baselines = {}
    for dataset in sorted(image_datasets):
        baselines.update(reference_likelihoods(dataset, suite.datamodule(dataset)))
    bars = bits_per_dim_bars(entries, out / "bits_per_dim.png", baselines)
    if bars is not None:
        figures["bits/dim by model"] = bars
    for metric in CURVE_METRICS:
        if any(r.get("curve") for r in rows):
            curves = budget_curves(rows, image_datasets, metric, out / f"budget_{metric}.png")
            if curves is not None:
                figures[f"{metric} against training steps and seconds"] = curves
    samples, without = {}, []
    for row in rows:
        path = Store(out).link(_slug(row)) / "samples.pt"
        if row["seed"] == min(r["seed"] for r in rows):
            if not path.is_file():  # an adopted run (--adopt) keeps its picture, samples/<run>.png, not its samples
                without.append(row["model"])
                continue
            kept = torch.load(path, weights_only=True)
            dm = suite.datamodule(row["dataset"])
            samples[(row["dataset"], row["model"])] = dm.to_pixels(kept) if dm.is_discrete else kept
    if without or not samples:  # a montage missing some models would read as the whole suite: none, not a stale one
        (out / "montage.png").unlink(missing_ok=True)
    else:
        real = {d: _real_for_montage(suite.datamodule(d, seed=0), 2000 if d not in image_datasets else 36)
                for d in {d for d, _ in samples}}
        figures["samples of every model beside real data"] = montage(samples, real, out / "montage.png",
                                                                           suite.models)
    return figures


def _slug(row: dict) -> str:
    return run_slug(row["dataset"], row["model"], row["seed"])


def _publish_samples(rows: Sequence[dict], out: Path) -> None:
    """``samples/<slug>.png`` of every reported run, copied from its run directory, so that the report
    (table, results.json, figures, samples/) is complete without the run directories."""
    store = Store(out)
    for row in rows:
        if row.get("samples_png"):
            picture = store.link(_slug(row)) / "samples.png"
            if picture.is_file():
                atomic_write_bytes(out / row["samples_png"], picture.read_bytes())


def _write_csv(entries, path: Path) -> None:
    keys = sorted({k for e in entries for k, v in e.items() if isinstance(v, tuple)})
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["dataset", "model", "family", "seeds"] + [f"{k}{s}" for k in keys for s in ("", "_std")])
    for e in entries:
        values = []
        for k in keys:
            values += list(e[k]) if k in e else ["", ""]
        writer.writerow([e["dataset"], e["model"], e.get("family", ""), len(e["seeds"])] + values)
    atomic_write_text(path, text.getvalue())
