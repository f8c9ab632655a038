"""Aggregate a suite's per-seed results and print them as markdown: the lecture's comparison table with
a measured row under each qualitative one, and one detailed table per dataset.

With up to :data:`PER_SEED_UP_TO` seeds a cell prints every seed's value in seed order (``80.1 / 81.9``); with
more, ``mean ± sd`` with the sample standard deviation (n - 1). No column mixes units or kinds: bits/dim
(discrete data) and NLL gaps in nats (2D data) sit in separate tables, and every likelihood carries the label
of what it is (``evaluation/likelihood_labels.py``).
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


PER_SEED_UP_TO = 3  # seeds whose values a cell lists one by one; beyond, mean ± sample sd

# Strings every seed of a model shares, kept beside the numbers (what a likelihood is, how samples were drawn).
LABEL_PREFIXES = ("likelihood_label_", "likelihood_source_")
LABEL_KEYS = ("family", "objective", "likelihood_declared", "weights", "extractor", "reference_split", "reasons",
              "sample_mode", "floor_split")


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One entry per (dataset, model): every numeric key as ``{key: (mean, sd)}`` (sd: sample standard deviation,
    0 with one seed), ``entry["per_seed"][key]``: the values in seed order, ``entry["flags"][key]``: boolean keys
    (e.g. ``energy_distance_within_noise``) per seed, plus the labels."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["model"])].append(row)
    out = []
    for (dataset, model), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        entry = {"dataset": dataset, "model": model, "seeds": [r["seed"] for r in members], "per_seed": {},
                 "flags": {}}
        numeric_keys = {k for r in members for k, v in r.items() if _is_number(v)} - {"seed"}
        for key in sorted(numeric_keys):
            values = [float(r[key]) for r in members if _is_number(r.get(key))]
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            entry[key] = (mean, sd)
            entry["per_seed"][key] = values
        for key in {k for r in members for k, v in r.items() if isinstance(v, bool)}:
            entry["flags"][key] = [r[key] for r in members if isinstance(r.get(key), bool)]
        for key in (*LABEL_KEYS, *{k for r in members for k in r if k.startswith(LABEL_PREFIXES)}):
            values = [r.get(key) for r in members if r.get(key) is not None]
            if values:
                entry[key] = values[0] if key != "weights" else "/".join(sorted(set(values)))
        out.append(entry)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cell(entry: dict, key: str, fmt: str = "{:.3f}", spread: bool = True) -> str:
    """Each seed's value of ``key`` (``a / b``) up to :data:`PER_SEED_UP_TO` seeds, else ``mean ± sd`` (sample
    sd); just the mean with one seed, ``spread=False`` or a key the suite fixes; ``-`` when absent."""
    if key not in entry:
        return "-"
    mean, sd = entry[key]
    values = entry.get("per_seed", {}).get(key, [mean])
    if not spread or len(values) < 2 or key in CONSTANT_KEYS:
        return fmt.format(mean)
    if len(values) <= PER_SEED_UP_TO:
        return " / ".join(fmt.format(v) for v in values)
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(sd)}"


def spread_note(entries: Sequence[dict]) -> str:
    """How the cells of ``entries`` show the seeds (for the report's header)."""
    counts = sorted({len(e["seeds"]) for e in entries})
    if not counts or counts[-1] < 2:
        return "one seed per model: each cell is that run's value."
    if counts[-1] <= PER_SEED_UP_TO:
        return ("cells with several values list each seed's value in seed order (`a / b`); each seed trains and "
                "draws its samples with its own seed, so their difference is training plus sampling noise "
                "(with the evaluation's `sampling_std_draws`, results.json also holds the sampling noise alone).")
    return "`mean ± sd` over seeds, sd the sample standard deviation (n - 1)."


def _steps(entry: dict) -> str:
    return f"{cell(entry, 'optimizer_steps', '{:,.0f}', False)} × {cell(entry, 'batch_size', '{:.0f}', False)}"


# Set by the suite, identical across seeds: shown without a spread.
CONSTANT_KEYS = {"params", "optimizer_steps", "batch_size", "devices", "n_reference", "n_quality", "n_floor",
                 "sample_batch_size", "num_modes", "likelihood_examples", "true_entropy_nats",
                 # floors depend on the data split only, not on the model's seed
                 "fid_floor", "kid_floor", "energy_distance_floor", "class_fid_floor", "class_kid_floor",
                 "class_accuracy_real", "guidance", "n_quality_per_class",
                 # real-vs-real nulls: properties of the data at the samples' n (shown as their mean)
                 "energy_distance_null_mean", "energy_distance_null_std", "mmd_null_mean", "mmd_null_std",
                 "ce_gap_nats_null_mean", "ce_gap_nats_null_std"}

# (header, key, format) per dataset kind; a column is shown when any model has it.
COMMON = (("params", "params", "{:,.0f}"), ("train s", "train_seconds", "{:.1f}"),
          ("examples/s", "examples_per_second", "{:,.0f}"), ("NFE/sample", "nfe_per_sample", "{:.0f}"),
          ("ms/sample", "ms_per_sample", "{:.3f}"))
# Discrete data: the headline (the lowest upper bound on the discrete NLL, its label in the next column), the IW-K
# values, then each likelihood at the split's one fixed dequantisation draw.
IMAGE_COLUMNS = COMMON + (("bits/dim (discrete NLL, upper bound)", "bpd_discrete", "{:.3f}"),) + tuple(
    (f"bits/dim IW-K ({KIND_LABEL[k]})", f"bpd_iw_{k}", "{:.3f}") for k in LIKELIHOOD_KINDS) + tuple(
    (f"bits/dim 1 draw ({KIND_LABEL[k]})", f"bpd_{k}", "{:.3f}") for k in LIKELIHOOD_KINDS) + (
    ("FID", "fid", "{:.2f}"), ("FID floor", "fid_floor", "{:.2f}"), ("KID", "kid", "{:.3g}"),
    ("KID floor", "kid_floor", "{:.3g}"), ("precision", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}"),
    ("FID, true draws", "fid_true_draws", "{:.2f}"), ("posterior gap (nats)", "posterior_gap_nats", "{:.2f}"),
    # class-conditional models only (the column appears when a model has the key)
    ("guidance w", "guidance", "{:g}"), ("class accuracy", "class_accuracy", "{:.3f}"),
    ("class accuracy (real)", "class_accuracy_real", "{:.3f}"), ("class FID", "class_fid", "{:.2f}"),
    ("class FID floor", "class_fid_floor", "{:.2f}"), ("class KID", "class_kid", "{:.3g}"))
POINT_COLUMNS = COMMON + tuple((f"NLL gap, nats ({KIND_LABEL[k]})", f"nll_gap_{k}", "{:+.3f}")
                               for k in LIKELIHOOD_KINDS) + (
    ("CE gap, nats", "ce_gap_nats", "{:+.3f}"), ("CE gap, real", "ce_gap_nats_null_mean", "{:+.3f}"),
    ("energy dist.", "energy_distance", "{:.4f}"), ("ED, real", "energy_distance_null_mean", "{:.4f}"),
    ("ED, real sd", "energy_distance_null_std", "{:.4f}"), ("MMD²", "mmd", "{:.4f}"),
    ("MMD², real sd", "mmd_null_std", "{:.4f}"), ("ED floor", "energy_distance_floor", "{:.4f}"),
    ("precision", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}"), ("modes hit", "modes_hit", "{:.0f}"),
    ("mode KL (nats)", "mode_kl", "{:.3f}"), ("posterior gap (nats)", "posterior_gap_nats", "{:.2f}"))


def dataset_table(entries: Sequence[dict], image: bool) -> str:
    columns = [c for c in (IMAGE_COLUMNS if image else POINT_COLUMNS) if any(c[1] in e for e in entries)]
    which = image and any("likelihood_label_discrete" in e for e in entries)
    header = ["model", "objective", "steps × batch", *[c[0] for c in columns], "weights"]
    if which:  # what the headline bits/dim is, right after it
        header.insert(header.index("bits/dim (discrete NLL, upper bound)") + 1, "which bound")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in entries:
        cells = [entry["model"], entry.get("objective", "-"), _steps(entry)]
        for _, key, fmt in columns:
            cells.append(cell(entry, key, fmt))
            if which and key == "bpd_discrete":
                cells.append(entry.get("likelihood_label_discrete", "-"))
        cells.append(entry.get("weights", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _likelihood_label(entry: dict, kind: str) -> str:
    """What ``nll_<kind>`` of this entry is: the evaluator's label where the run recorded one, else the kind's."""
    return entry.get(f"likelihood_label_{kind}", KIND_LABEL[kind])


def _likelihood_summary(entry: dict, image: bool) -> str:
    """Discrete data: the headline is ``bpd_discrete``, the lowest of the model's upper bounds on the discrete NLL
    (so rows compare the same quantity), with its label; the model's other likelihoods follow, labelled. 2D data:
    the NLL gap of every kind, labelled."""
    parts, shown = [], set()
    if image and "bpd_discrete" in entry:
        parts.append(f"{cell(entry, 'bpd_discrete', '{:.2f}')} bits/dim "
                     f"({entry.get('likelihood_label_discrete', 'upper bound on the discrete NLL')})")
        shown.add(entry.get("likelihood_source_discrete"))
    for kind in LIKELIHOOD_KINDS:
        key = f"bpd_{kind}" if image else f"nll_gap_{kind}"
        if key in entry and key not in shown:
            unit = "bits/dim" if image else "nats gap"
            parts.append(f"{cell(entry, key, '{:.2f}' if image else '{:+.3f}')} {unit} "
                         f"({_likelihood_label(entry, kind)})")
    return "; ".join(parts) if parts else "none"


def _null_note(entry: dict, key: str, fmt: str) -> str:
    """``real: m ± sd`` (the real-vs-real null at the same n) and how many seeds lie within its noise."""
    if f"{key}_null_mean" not in entry:
        return ""
    mean, sd = entry[f"{key}_null_mean"][0], entry[f"{key}_null_std"][0]
    flags = entry.get("flags", {}).get(f"{key}_within_noise", [])
    within = sum(flags)
    verdict = ("within data noise" if flags and within == len(flags) else
               f"{within} of {len(flags)} seeds within data noise" if within else "")
    note = f"real: {fmt.replace('+', '').format(mean)} ± {fmt.replace('+', '').format(sd)}"
    return f" ({note}{', ' + verdict if verdict else ''})"


def _modes(entry: dict) -> str:
    """Modes hit per seed, out of the dataset's own mode count: ``2 / 8 modes hit (of 8)``."""
    values = entry.get("per_seed", {}).get("modes_hit", [entry["modes_hit"][0]])
    total = f" (of {entry['num_modes'][0]:.0f})" if "num_modes" in entry else ""
    return f"{' / '.join(f'{v:.0f}' for v in values)} modes hit{total}"


def _quality_summary(entry: dict, image: bool) -> str:
    if image:
        if "fid" not in entry:
            return "-"
        text = (f"FID {cell(entry, 'fid', '{:.1f}')} (floor {cell(entry, 'fid_floor', '{:.1f}', False)}), "
                f"P {cell(entry, 'precision', '{:.2f}')}, R {cell(entry, 'recall', '{:.2f}')}")
        if entry.get("sample_mode") == "mean":  # the VAE's decoder means: say so, and give its true draws too
            text += " on decoder means"
            if "fid_true_draws" in entry:
                text += f"; true draws: FID {cell(entry, 'fid_true_draws', '{:.1f}')}"
        return text
    if "energy_distance" not in entry:
        return "-"
    parts = []
    if "ce_gap_nats" in entry:  # precision-side: mass between the modes, what the scatter plots show
        null = _null_note(entry, "ce_gap_nats", "{:+.2f}")
        parts.append(f"CE gap {cell(entry, 'ce_gap_nats', '{:+.2f}')} nats{null}")
    elif "off_support_fraction" in entry:
        parts.append(f"off support {cell(entry, 'off_support_fraction', '{:.3f}')}")
    parts.append(f"ED {cell(entry, 'energy_distance', '{:.4f}')}{_null_note(entry, 'energy_distance', '{:.4f}')}")
    if "modes_hit" in entry:
        parts.append(_modes(entry))
    return ", ".join(parts)


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
    # The seed spread as a share of the value only where the metric's floor is far from zero (FID); an energy
    # distance near zero makes any ratio meaningless, and its per-seed values and data noise are in the quality cell.
    if image and "fid" in entry and len(entry["seeds"]) > 1:
        mean, sd = entry["fid"]
        parts.append(f"seed sd {sd:.1f} FID ({100 * sd / max(abs(mean), 1e-12):.0f}%)")
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
