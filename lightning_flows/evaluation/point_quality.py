"""Sample quality on 2D (point) data, and what real data itself scores: the null each number is read against.

Metrics of ``n`` samples against the first ``n`` points of the reference split (:func:`point_metrics`):

* ``energy_distance``: unbiased U-statistic (:mod:`lightning_flows.metrics.energy_distance`); blind to mass
  smeared between nearby modes, kept for continuity.
* ``mmd``: unbiased ``MMD^2`` with a Gaussian kernel at the data's own length scale (a mixture's component std
  where the dataset declares one, else the median heuristic on the reference): it sees a ring where there
  should be eight clusters.
* ``ce_gap_nats``: the samples' cross-entropy under the true density minus the true entropy, for densities with
  a closed-form ``log p`` (:mod:`lightning_flows.metrics.cross_entropy_gap`); where the true density is zero at
  some sample (checkerboard: a point off the board) it is infinite, and ``off_support_fraction`` is reported
  instead.
* ``precision`` / ``recall`` (k-NN, coordinates) and, for mixtures with known modes, mode coverage.

The null (:func:`point_reference`): the same metrics of ``null_draws`` real sets of ``n`` points against the same
reference -- fresh draws of the dataset's sampler (toy densities), else random subsets of the floor split --
give each metric's mean and std under "the samples are real data". A model's value within
``NOISE_SIGMAS`` null std of the null mean is within data noise. Energy distance, MMD and the CE gap are
unbiased estimators centred near 0 for real data, so negative values are legitimate outcomes, for real data
and for models alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lightning_flows.data.toy2d import TOY_MODES, TOY_SAMPLERS
from lightning_flows.evaluation.spec import floor_split_for
from lightning_flows.metrics import energy_distance, mode_coverage, precision_recall
from lightning_flows.metrics.cross_entropy_gap import cross_entropy_gap
from lightning_flows.metrics.kernel_mmd import gaussian_mmd2, median_bandwidth

NOISE_SIGMAS = 2.0  # "within data noise": |value - null mean| <= NOISE_SIGMAS * null std
NULL_SEED = 7_000_003  # fresh null draw r uses torch.Generator().manual_seed(NULL_SEED + r)
ENTROPY_DRAWS = 200_000  # Monte Carlo points for the true entropy (std error ~ std(log p) / 450)
ENTROPY_SEED = 7_500_007
NULL_CACHE_VERSION = 1  # bump when the null's computation changes
# The metrics with a null (real-vs-real) distribution reported beside them.
NULL_METRICS = ("energy_distance", "mmd", "ce_gap_nats")
# The cheap metrics whose spread over sampling seeds is reported (see EvaluationSpec.sampling_std_draws).
SAMPLING_STD_METRICS = ("energy_distance", "mmd", "ce_gap_nats", "off_support_fraction", "precision", "recall",
                        "modes_hit", "good_fraction", "mode_kl")


@dataclass
class PointReference:
    """What the samples of one 2D dataset are scored against (data only: the same for every model)."""

    reference: Tensor  # (n, D): the first n points of the reference split
    bandwidth: float
    bandwidth_source: str  # "component std" or "median heuristic"
    log_density: Callable[[Tensor], Tensor] | None = None
    entropy: float | None = None  # H(p) by Monte Carlo on ENTROPY_DRAWS fresh points
    null: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (mean, std) over null draws
    null_source: str = ""
    null_draws: int = 0


def true_entropy(dataset: str, log_density: Callable[[Tensor], Tensor]) -> float:
    """``H(p) = -E log p`` of a toy density, by Monte Carlo on :data:`ENTROPY_DRAWS` fresh points (fixed seed)."""
    points = TOY_SAMPLERS[dataset](ENTROPY_DRAWS, torch.Generator().manual_seed(ENTROPY_SEED))
    return float(-log_density(points).double().mean())


def distribution_metrics(samples: Tensor, ref: PointReference) -> dict:
    """The metrics of ``samples: (n, D)`` that have a null: energy distance, MMD and the CE gap (or the
    off-support fraction)."""
    samples = samples.detach().cpu()
    out = {"energy_distance": float(energy_distance(samples, ref.reference)),
           "mmd": gaussian_mmd2(samples, ref.reference, ref.bandwidth)}
    if ref.log_density is not None:
        gap = cross_entropy_gap(samples, ref.log_density, ref.entropy)
        if math.isfinite(gap):
            out["ce_gap_nats"] = gap
        else:  # some sample where p = 0 (off a bounded support)
            out["off_support_fraction"] = float(torch.isinf(ref.log_density(samples)).double().mean())
    return out


def point_metrics(samples: Tensor, ref: PointReference, dataset: str, pr_k: int) -> dict:
    """Every point metric of ``samples: (n, D)`` against ``ref`` (see the module docstring)."""
    samples = samples.detach().cpu()
    precision, recall = precision_recall(ref.reference, samples, pr_k)
    out = {**distribution_metrics(samples, ref), "precision": precision, "recall": recall}
    if dataset in TOY_MODES:
        centres, std = TOY_MODES[dataset]
        coverage = mode_coverage(samples, centres, std)
        out.update(modes_hit=coverage.modes_hit, num_modes=coverage.num_modes, mode_kl=coverage.kl_to_uniform,
                   good_fraction=coverage.good_fraction)
    return out


def _null_sets(datamodule, floor_split: str, n: int, draws: int) -> tuple[list[Tensor], str]:
    """``draws`` real sets of ``n`` points, none of them the reference: fresh draws of the dataset's sampler, or
    random subsets of the floor split (fewer points if it holds fewer than ``n``)."""
    sampler = TOY_SAMPLERS.get(datamodule.dataset)
    if sampler is not None:
        sets = [sampler(n, torch.Generator().manual_seed(NULL_SEED + r)) for r in range(draws)]
        return sets, "fresh draws of the true sampler"
    pool = datamodule.split(floor_split)
    size = min(n, len(pool))
    sets = [pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(NULL_SEED + r))[:size]]
            for r in range(draws)]
    return sets, f"random subsets of the {floor_split} split"


def point_reference(datamodule, reference_split: str, floor_split: str, n: int, null_draws: int,
                    cache_dir: Path | None = None) -> PointReference:
    """The reference of ``n`` samples on a 2D dataset, with the null of :data:`NULL_METRICS` (data only, so it is
    cached under ``<cache_dir>/point_nulls/``, keyed by everything that defines it)."""
    reference = datamodule.split(reference_split)[:n]
    dataset = datamodule.dataset
    if dataset in TOY_MODES:
        bandwidth, source = float(TOY_MODES[dataset][1]), "component std"
    else:
        bandwidth, source = median_bandwidth(reference), "median heuristic"
    log_density = datamodule.splits.log_density
    ref = PointReference(reference, bandwidth, source, log_density)
    key = hashlib.sha256(json.dumps([NULL_CACHE_VERSION, dataset, reference_split, floor_split, n, null_draws,
                                     bandwidth, NULL_SEED, ENTROPY_DRAWS, ENTROPY_SEED]).encode())
    key.update(reference.contiguous().numpy().tobytes())
    path = None if cache_dir is None else Path(cache_dir) / "point_nulls" / f"{dataset}_{key.hexdigest()[:16]}.json"
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
            ref.entropy, ref.null_source, ref.null_draws = cached["entropy"], cached["source"], cached["draws"]
            ref.null = {k: tuple(v) for k, v in cached["null"].items()}
            return ref
        except (OSError, ValueError, KeyError):
            pass  # unreadable: recompute
    if log_density is not None and dataset in TOY_SAMPLERS:
        ref.entropy = true_entropy(dataset, log_density)
    elif log_density is not None:  # a density without a sampler: the entropy on the reference itself
        ref.entropy = float(-log_density(reference).double().mean())
    sets, ref.null_source = _null_sets(datamodule, floor_split, n, null_draws)
    values: dict[str, list[float]] = {}
    for points in sets:
        for metric, value in distribution_metrics(points, ref).items():
            values.setdefault(metric, []).append(value)
    ref.null = {metric: mean_and_std(v) for metric, v in values.items() if metric in NULL_METRICS}
    ref.null_draws = len(sets)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"entropy": ref.entropy, "source": ref.null_source, "draws": ref.null_draws,
                                   "null": ref.null}))
        os.replace(tmp, path)  # atomic: a concurrent reader (another rank) never sees half a file
    return ref


def refresh_nulls(result: dict, datamodule, reference_split: str, null_draws: int,
                  cache_dir: Path | None = None) -> dict:
    """``result`` (a finished 2D run's row, or one point of its curve) with its null fields recomputed from
    ``null_draws`` real sets: the null is data only, so a stored result takes the current evaluator's null without
    retraining or resampling, and its own metrics stay as they were. A result without a null (images) comes back
    unchanged. Raises ``ValueError`` when ``datamodule``'s reference is not the one the result was scored against
    (its ``energy_distance_floor`` differs), so that a null is never set beside another reference's numbers."""
    if "null_draws" not in result or "n_quality" not in result:
        return result
    n, floor_split = int(result["n_quality"]), floor_split_for(reference_split)
    ref = point_reference(datamodule, reference_split, floor_split, n, null_draws, cache_dir)
    if "energy_distance_floor" in result:
        floor = float(energy_distance(datamodule.split(floor_split)[:n], ref.reference))
        if not math.isclose(floor, result["energy_distance_floor"], rel_tol=1e-4, abs_tol=1e-7):
            raise ValueError(f"the {datamodule.dataset} reference rebuilt here has the energy-distance floor "
                             f"{floor:.6g}, the result's is {result['energy_distance_floor']:.6g}: not the points it "
                             f"was scored against, so its null is kept as it was.")
    refreshed = dict(result)
    refreshed.update({key: value for key, value in null_fields(result, ref).items() if key in result})
    refreshed["null_draws"] = ref.null_draws
    if "null_source" in result:
        refreshed["null_source"] = ref.null_source
    return refreshed


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and *sample* std (``n - 1``) of ``values`` (at least 2)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True))


def null_fields(metrics: dict, ref: PointReference) -> dict:
    """``<metric>_null_mean``, ``<metric>_null_std`` and ``<metric>_within_noise`` for the metrics with a null."""
    out: dict = {}
    for key, (mean, std) in ref.null.items():
        if key not in metrics:
            continue
        out[f"{key}_null_mean"], out[f"{key}_null_std"] = mean, std
        out[f"{key}_within_noise"] = bool(abs(metrics[key] - mean) <= NOISE_SIGMAS * std)
    return out
