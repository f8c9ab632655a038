"""The benchmark's figures (PNG): quality vs sampling cost, bits/dim by model, and a sample montage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from lightning_flows.benchmark.store import atomic_output
from lightning_flows.benchmark.table import KIND_LABEL, LIKELIHOOD_KINDS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a concurrent reader of the report never sees half a PNG)."""
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    return path


def quality_vs_cost(entries: Sequence[dict], image_datasets: set[str], path: Path) -> Path:
    """Per dataset: FID (images) or energy distance (2D) against ms/sample on a log axis, error bars over seeds,
    one point per model, the real-vs-real floor as a dashed line."""
    plt = _plt()
    datasets = sorted({e["dataset"] for e in entries})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        image = dataset in image_datasets
        key, label = ("fid", "FID") if image else ("energy_distance", "energy distance")
        members = [e for e in entries if e["dataset"] == dataset and key in e and "ms_per_sample" in e]
        for e in members:
            (x, xs), (y, ys) = e["ms_per_sample"], e[key]
            ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o", capsize=3)
            ax.annotate(e["model"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        floors = [e[f"{key}_floor"][0] for e in members if f"{key}_floor" in e]
        if floors:
            ax.axhline(sum(floors) / len(floors), color="grey", linestyle="--", linewidth=1, label="real vs real")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("ms per sample (log)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.set_title(dataset)
    return _save(fig, path)


def bits_per_dim_bars(entries: Sequence[dict], path: Path, baselines: dict[str, float] | None = None) -> Path | None:
    """Bits/dim by model on the discrete datasets; exact solid, unbiased estimates dotted, bounds hatched."""
    bars = [(e["dataset"], e["model"], kind, e[f"bpd_{kind}"]) for e in entries for kind in LIKELIHOOD_KINDS
            if f"bpd_{kind}" in e]
    if not bars:
        return None
    plt = _plt()
    style = {"exact": {"hatch": "", "linestyle": "-"}, "estimate": {"hatch": "..", "linestyle": ":"},
             "bound": {"hatch": "//", "linestyle": "--"}}
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(bars) + 2), 4.2))
    for i, (_, _, kind, (mean, std)) in enumerate(bars):
        base = kind.split("_")[0]  # exact_noisy, estimate_instantaneous, ...: drawn as their base kind
        ax.bar(i, mean, yerr=std, capsize=3, color="white" if kind != "exact" else "C0", edgecolor="C0",
               hatch=style[base]["hatch"], linestyle=style[base]["linestyle"], label=KIND_LABEL[kind])
    for j, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, color=f"C{j + 1}", linestyle="--", linewidth=1, label=name)
    ax.set_xticks(range(len(bars)), [f"{m}\n{d}" for d, m, _, _ in bars], fontsize=8)
    ax.set_ylabel("test bits/dim (lower is better)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    return _save(fig, path)


def montage(samples: dict[tuple[str, str], torch.Tensor], real: dict[str, torch.Tensor], path: Path,
            models: Sequence[str] | None = None) -> Path:
    """One row per dataset, one column per model (real data first): image grids or 2D scatter plots.

    ``samples[(dataset, model)]`` and ``real[dataset]``: pixels ``(N, C, H, W)`` in [0, 1] or points ``(N, 2)``.
    """
    import torchvision

    plt = _plt()
    datasets = sorted(real)
    present = {m for _, m in samples}
    models = [m for m in (models or sorted(present)) if m in present]
    fig, axes = plt.subplots(len(datasets), len(models) + 1, figsize=(2.4 * (len(models) + 1), 2.5 * len(datasets)),
                             squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, name in enumerate(["real data", *models]):
            ax = axes[row][col]
            data = real[dataset] if col == 0 else samples.get((dataset, name))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name if row == 0 else "", fontsize=9)
            if col == 0:
                ax.set_ylabel(dataset, fontsize=9)
            if data is None:
                continue
            if data.ndim == 4:
                grid = torchvision.utils.make_grid(data[:36].float(), nrow=int(math.sqrt(min(36, len(data)))),
                                                   padding=1, pad_value=1.0)
                ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                ax.scatter(data[:, 0], data[:, 1], s=0.5, alpha=0.5)
                ax.set_xlim(-5, 5)
                ax.set_ylim(-5, 5)
                ax.set_aspect("equal")
    return _save(fig, path)


def budget_curves(rows: Sequence[dict], image_datasets: set[str], metric: str, path: Path) -> Path | None:
    """``metric`` ("quality": FID / energy distance; "likelihood": bits/dim / NLL gap) against training steps
    (left) and training seconds (right), one row per dataset, one line per model: the mean over seeds, with the
    band from the lowest to the highest seed. None when no run has a curve of that number."""
    from lightning_flows.benchmark.table import curve_series

    datasets = sorted({r["dataset"] for r in rows if r.get("curve")})
    panels = {d: curve_series([r for r in rows if r["dataset"] == d], d in image_datasets, metric) for d in datasets}
    panels = {d: series for d, series in panels.items() if series}
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.0 * len(panels)), squeeze=False)
    for (dataset, series), row in zip(panels.items(), axes):
        for i, (model, entry) in enumerate(series.items()):
            points = [(step, seconds, list(values.values())) for step, seconds, values
                      in zip(entry["steps"], entry["seconds"], entry["values"]) if values]
            if not points:
                continue
            for ax, x in zip(row, ([p[0] for p in points], [p[1] for p in points])):
                mean = [sum(v) / len(v) for _, _, v in points]
                ax.plot(x, mean, marker="o", color=f"C{i % 10}", label=f"{model} ({entry['key']})")
                ax.fill_between(x, [min(v) for _, _, v in points], [max(v) for _, _, v in points],
                                color=f"C{i % 10}", alpha=0.2, linewidth=0)
        keys = sorted({entry["key"] for entry in series.values()})
        for ax, xlabel in zip(row, ("training steps (per network)", "training seconds (no evaluation)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{', '.join(keys)} (lower is better)")
            ax.set_title(f"{dataset}: {metric} against {xlabel.split(' (')[0]}")
            ax.legend(fontsize=7)
    return _save(fig, path)
