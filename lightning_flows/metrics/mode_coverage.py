"""Mode coverage of a mixture with known modes (8gaussians): the lecture's "mode collapse", counted.

Every sample is assigned to its nearest mode centre and counts as a *good* sample when it lies
within ``3 std`` of it. A mode is *hit* when it receives at least ``min_share`` of the samples
(1% by default, against an expected 1/K). The mode histogram of the good samples is compared with
the uniform mixture weights by ``KL(histogram || uniform)`` in nats: 0 for perfect balance,
``log K`` when every sample falls in one mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ModeCoverage:
    modes_hit: int
    num_modes: int
    kl_to_uniform: float
    good_fraction: float  # samples within 3 std of their nearest mode


def mode_coverage(samples: Tensor, centres: Tensor, std: float, min_share: float = 0.01) -> ModeCoverage:
    """``samples: (N, D)``, ``centres: (K, D)`` of an equal-weight mixture with per-mode ``std``."""
    samples, centres = samples.double(), centres.double().to(samples.device)
    distance, nearest = torch.cdist(samples, centres).min(dim=1)
    good = distance <= 3 * std
    counts = torch.bincount(nearest[good], minlength=len(centres)).double()
    hit = int((counts >= min_share * len(samples)).sum())
    total = counts.sum()
    if total == 0:
        return ModeCoverage(0, len(centres), math.log(len(centres)), 0.0)
    p = counts / total
    kl = float((p[p > 0] * (p[p > 0] * len(centres)).log()).sum())
    return ModeCoverage(hit, len(centres), kl, float(good.double().mean()))
