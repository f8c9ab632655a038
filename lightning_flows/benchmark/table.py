"""Aggregate a suite's per-seed results and print them as markdown: the lecture's comparison table with
a measured row under each qualitative one, and one detailed table per dataset.

Every cell is ``mean ± std`` over seeds (population std; the seed count is in the header). No column
mixes units or kinds: bits/dim (discrete data) and NLL gaps in nats (2D data) sit in separate tables,
and exact likelihoods, bounds and unbiased estimates in separate columns.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Sequence

from lightning_flows.benchmark.lecture import BEYOND_THE_LECTURE, LECTURE_COLUMNS, lecture_row

# What a family's log_prob is (GenerativeModel.likelihood_kind / likelihood_estimators): the three plain kinds, and
# the exact densities of something other than the data's own model (TarFlow: of the noise-augmented data;
# MeanFlow: of the ODE of its instantaneous velocity, not of its few-step sampler).
LIKELIHOOD_KINDS = ("exact", "estimate", "bound", "exact_noisy", "exact_instantaneous", "estimate_instantaneous")
KIND_LABEL = {"exact": "exact", "estimate": "unbiased est.", "bound": "bound",
              "exact_noisy": "exact, of data + N(0, sigma^2)", "exact_instantaneous": "exact, ODE of u(z, t, t)",
              "estimate_instantaneous": "unbiased est., ODE of u(z, t, t)"}


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One entry per (dataset, model): every numeric key as ``{key: (mean, std)}`` plus the constant labels."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["model"])].append(row)
    out = []
    for (dataset, model), members in groups.items():
        entry = {"dataset": dataset, "model": model, "seeds": sorted(r["seed"] for r in members)}
        numeric_keys = {k for r in members for k, v in r.items() if _is_number(v)} - {"seed"}
        for key in sorted(numeric_keys):
            values = [float(r[key]) for r in members if _is_number(r.get(key))]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            entry[key] = (mean, std)
        for key in ("family", "objective", "likelihood_declared", "weights", "extractor", "reference_split",
                    "reasons"):
            values = [r.get(key) for r in members if r.get(key) is not None]
            if values:
                entry[key] = values[0] if key != "weights" else "/".join(sorted(set(values)))
        out.append(entry)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cell(entry: dict, key: str, fmt: str = "{:.3f}", spread: bool = True) -> str:
    """``mean ± std`` of ``key`` (just the mean with one seed or ``spread=False``), or ``-``."""
    if key not in entry:
        return "-"
    mean, std = entry[key]
    text = fmt.format(mean)
    if not spread or len(entry["seeds"]) < 2 or key in CONSTANT_KEYS:
        return text
    return f"{text} ± {fmt.replace('+', '').format(std)}"


def _steps(entry: dict) -> str:
    return f"{cell(entry, 'optimizer_steps', '{:,.0f}', False)} × {cell(entry, 'batch_size', '{:.0f}', False)}"


# Set by the suite, identical across seeds: shown without a spread.
CONSTANT_KEYS = {"params", "optimizer_steps", "batch_size", "devices", "n_reference", "n_quality", "n_floor",
                 "sample_batch_size", "num_modes", "likelihood_examples", "true_entropy_nats",
                 # floors depend on the data split only, not on the model's seed
                 "fid_floor", "kid_floor", "energy_distance_floor", "class_fid_floor", "class_kid_floor",
                 "class_accuracy_real", "guidance", "n_quality_per_class"}

# (header, key, format) per dataset kind; a column is shown when any model has it.
COMMON = (("params", "params", "{:,.0f}"), ("train s", "train_seconds", "{:.1f}"),
          ("examples/s", "examples_per_second", "{:,.0f}"), ("NFE/sample", "nfe_per_sample", "{:.0f}"),
          ("ms/sample", "ms_per_sample", "{:.3f}"))
IMAGE_COLUMNS = COMMON + tuple((f"bits/dim ({KIND_LABEL[k]})", f"bpd_{k}", "{:.3f}") for k in LIKELIHOOD_KINDS) + (
    ("FID", "fid", "{:.2f}"), ("FID floor", "fid_floor", "{:.2f}"), ("KID", "kid", "{:.3g}"),
    ("KID floor", "kid_floor", "{:.3g}"), ("precision", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}"),
    ("posterior gap (nats)", "posterior_gap_nats", "{:.2f}"),
    # class-conditional models only (the column appears when a model has the key)
    ("guidance w", "guidance", "{:g}"), ("class accuracy", "class_accuracy", "{:.3f}"),
    ("class accuracy (real)", "class_accuracy_real", "{:.3f}"), ("class FID", "class_fid", "{:.2f}"),
    ("class FID floor", "class_fid_floor", "{:.2f}"), ("class KID", "class_kid", "{:.3g}"))
POINT_COLUMNS = COMMON + tuple((f"NLL gap, nats ({KIND_LABEL[k]})", f"nll_gap_{k}", "{:+.3f}")
                               for k in LIKELIHOOD_KINDS) + (
    ("energy dist.", "energy_distance", "{:.4f}"), ("ED floor", "energy_distance_floor", "{:.4f}"),
    ("precision", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}"), ("modes hit", "modes_hit", "{:.1f}"),
    ("mode KL (nats)", "mode_kl", "{:.3f}"), ("posterior gap (nats)", "posterior_gap_nats", "{:.2f}"))
def dataset_table(entries: Sequence[dict], image: bool) -> str:
    columns = [c for c in (IMAGE_COLUMNS if image else POINT_COLUMNS) if any(c[1] in e for e in entries)]
    header = ["model", "objective", "steps × batch", *[c[0] for c in columns], "weights"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in entries:
        cells = [entry["model"], entry.get("objective", "-"), _steps(entry)]
        cells += [cell(entry, key, fmt) for _, key, fmt in columns]
        cells.append(entry.get("weights", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _likelihood_summary(entry: dict, image: bool) -> str:
    parts = []
    for kind in LIKELIHOOD_KINDS:
        key = f"bpd_{kind}" if image else f"nll_gap_{kind}"
        if key in entry:
            unit = "bits/dim" if image else "nats gap"
            parts.append(f"{cell(entry, key, '{:.2f}' if image else '{:+.3f}')} {unit} ({KIND_LABEL[kind]})")
    return "; ".join(parts) if parts else "none"


def _quality_summary(entry: dict, image: bool) -> str:
    if image:
        if "fid" not in entry:
            return "-"
        return (f"FID {cell(entry, 'fid', '{:.1f}')} (floor {cell(entry, 'fid_floor', '{:.1f}', False)}), "
                f"P/R {cell(entry, 'precision', '{:.2f}', False)}/{cell(entry, 'recall', '{:.2f}', False)}")
    if "energy_distance" not in entry:
        return "-"
    text = f"ED {cell(entry, 'energy_distance', '{:.4f}')}"
    if "modes_hit" in entry:
        text += f", {cell(entry, 'modes_hit', '{:.0f}', False)}/8 modes"
    return text


def _limitation_summary(entry: dict, image: bool) -> str:
    """The lecture's "key limitation", as a number where the family has one."""
    family = entry.get("family", "")
    parts = []
    if "posterior_gap_nats" in entry:
        parts.append(f"posterior gap {cell(entry, 'posterior_gap_nats', '{:.2f}')} nats")
    if not image and "mode_kl" in entry and family == "GAN":
        parts.append(f"mode KL {cell(entry, 'mode_kl', '{:.3f}')} nats")
    if "nfe_per_sample" in entry and entry["nfe_per_sample"][0] > 1:  # ODE solves, reverse chains, sequential flows
        parts.append(f"{cell(entry, 'nfe_per_sample', '{:.0f}', False)} NFE/sample")
    quality = "fid" if image else "energy_distance"
    variants = {int(m[1]): m[0] for m in (re.fullmatch(f"{quality}_nfe([0-9]+)", k) for k in entry) if m}
    digits = "{:.1f}" if image else "{:.4f}"
    for nfe, key in sorted(variants.items()):  # other sampling settings (GenerativeModel.sampling_variants)
        parts.append(f"{'FID' if image else 'ED'} {cell(entry, key, digits)} at {nfe} NFE vs "
                     f"{cell(entry, quality, digits)} at {cell(entry, 'nfe_per_sample', '{:.0f}', False)}")
    if quality in entry and len(entry["seeds"]) > 1:
        mean, std = entry[quality]
        parts.append(f"seed spread {100 * std / max(abs(mean), 1e-12):.0f}% of {'FID' if image else 'ED'}")
    if family in ("RealNVP", "Glow", "NSF") and not image and "nll_gap_exact" in entry:
        parts.append(f"NLL gap {cell(entry, 'nll_gap_exact', '{:+.3f}')} nats")
    return "; ".join(parts) if parts else "-"


def lecture_table(entries: Sequence[dict], image_datasets: set[str]) -> str:
    """The lecture's rows, each followed by the measured row (one line per dataset in each cell); the families beyond
    the lecture come last, with their papers' claims in place of the lecture's."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: e.get("family") in BEYOND_THE_LECTURE):  # stable: suite order kept
        by_model[entry["model"]].append(entry)
    header = ["Method", "", *LECTURE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for model, members in by_model.items():
        family = members[0].get("family", model)
        method, source, claims = lecture_row(family)
        lines.append(f"| {method} ({model}) | {source} | " + " | ".join(claims) + " |")
        columns: list[list[str]] = [[] for _ in LECTURE_COLUMNS]
        for entry in members:
            image = entry["dataset"] in image_datasets
            tag = f"{entry['dataset']}: "
            columns[0].append(tag + f"{_steps(entry)} in {cell(entry, 'train_seconds', '{:.0f}', False)} s")
            columns[1].append(tag + f"{cell(entry, 'nfe_per_sample', '{:.0f}', False)} NFE, "
                                    f"{cell(entry, 'ms_per_sample', '{:.3f}', False)} ms/sample")
            columns[2].append(tag + _likelihood_summary(entry, image))
            columns[3].append(tag + _quality_summary(entry, image))
            columns[4].append(tag + _limitation_summary(entry, image))
        lines.append("| | measured | " + " | ".join("<br>".join(c) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def format_plan(suite, plan_rows: Sequence[dict], extra: Sequence[str]) -> str:
    """The ``--dry-run`` printout: every run of a suite with its budget and evaluation."""
    header = ("run", "config", "family", "params", "steps", "batch", "seeds", "evaluation")
    lines = [f"Suite '{suite.name}' ({suite.path}): {len(plan_rows)} models x {len(suite.seeds)} seeds; "
             f"extra fit arguments: {' '.join(extra) or 'none'}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in plan_rows:
        lines.append(f"| {r['run']} | {r['config']} | {r['family']} | {r['params']:,} | {r['steps']:,} | "
                     f"{r['batch_size']} | {r['seeds']} | {r['evaluation']} |")
    if suite.expected_wall_time:
        lines += ["", "Expected wall time: " + "; ".join(f"{k}: {v}" for k, v in suite.expected_wall_time.items())]
    return "\n".join(lines)


# --- quality and likelihood against the training budget (suites with `evaluate_at`) ---------------------------

CURVE_METRICS = ("quality", "likelihood")


def curve_key(points: Sequence[dict], image: bool, metric: str) -> str | None:
    """The number a curve of ``metric`` draws, read off a run's final point: quality is FID (images) or energy
    distance (2D); likelihood is bits/dim (images: the best upper bound on the discrete NLL where the evaluator
    chose one, else the first kind) or the NLL gap to the true entropy (2D)."""
    final = points[-1] if points else {}
    if metric == "quality":
        candidates = ["fid" if image else "energy_distance"]
    elif image:
        candidates = ["bpd_discrete"] + [f"bpd_{kind}" for kind in LIKELIHOOD_KINDS]
    else:
        candidates = [f"nll_gap_{kind}" for kind in LIKELIHOOD_KINDS]
    return next((key for key in candidates if key in final), None)


def curve_series(rows: Sequence[dict], image: bool, metric: str) -> dict[str, dict]:
    """Per model of ``rows`` (one dataset) with curves: ``{model: {"key", "steps", "seconds", "values"}}``, where
    ``steps[i]`` is a budget point, ``seconds[i]`` the mean training seconds there over seeds and ``values[i]``
    ``{seed: value}`` (seeds evaluated at that point only: a cheap point has no FID)."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("curve"):
            by_model[row["model"]].append(row)
    series = {}
    for model, members in by_model.items():
        key = curve_key(members[0]["curve"], image, metric)
        if key is None:
            continue
        steps = sorted({p["step"] for r in members for p in r["curve"]})
        seconds, values = [], []
        for step in steps:
            at = {r["seed"]: p for r in members for p in r["curve"] if p["step"] == step}
            times = [p["train_seconds"] for p in at.values() if _is_number(p.get("train_seconds"))]
            seconds.append(sum(times) / len(times) if times else math.nan)
            values.append({seed: p[key] for seed, p in sorted(at.items()) if _is_number(p.get(key))})
        series[model] = {"key": key, "steps": steps, "seconds": seconds, "values": values}
    return series


def curve_table(rows: Sequence[dict], image: bool, metric: str) -> str:
    """Markdown: one row per model, one column per budget point (step and mean training seconds), each cell the
    mean over seeds and the per-seed values; empty when no run has a curve of ``metric``."""
    series = curve_series(rows, image, metric)
    if not series:
        return ""
    steps = sorted({s for entry in series.values() for s in entry["steps"]})
    header = "| model | number | " + " | ".join(f"step {s}" for s in steps) + " |"
    lines = [header, "|" + "---|" * (len(steps) + 2)]
    for model, entry in series.items():
        cells = []
        for step in steps:
            if step not in entry["steps"] or not entry["values"][entry["steps"].index(step)]:
                cells.append("-")
                continue
            i = entry["steps"].index(step)
            values = list(entry["values"][i].values())
            mean = sum(values) / len(values)
            per_seed = " / ".join(f"{v:.3f}" for v in values)
            cells.append(f"{mean:.3f} ({per_seed}) at {entry['seconds'][i]:.3g} s")
        lines.append(f"| {model} | {entry['key']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
