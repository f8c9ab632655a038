"""FID and KID of two feature sets, computed by torchmetrics.

torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` normally run their own
extractor on images. Here the features are extracted once by the evaluator (one pass serves FID,
KID and precision/recall, and under DDP each rank extracts only its own share) and handed to the
torchmetrics objects through :class:`PrecomputedFeatures`, an identity "extractor": the formulas
(FID's matrix square root, KID's unbiased polynomial-kernel MMD) stay torchmetrics'.

* FID is biased at small sample counts (it shrinks with n); compare it only at equal n and
  reference set, beside the real-vs-real floor at that n.
* KID is unbiased: its expectation does not depend on the number of samples, which is what a CPU
  run with a few hundred samples can afford. Subsets are drawn with a fixed seed (reproducible). Their
  size is at most half of the smaller set (:func:`kid_subset_size`): a subset as large as a set is that
  whole set every time, and the std over subsets would then miss that set's share of the noise (0 when both
  sets are that size). The std over subsets is the noise of KID at the subset size, larger than at the
  full sets' n: a conservative error bar.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class PrecomputedFeatures(nn.Module):
    """The identity on ``(B, num_features)`` features, in the place of an image extractor."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _check(real: Tensor, fake: Tensor) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"FID/KID need feature matrices (N, F) with one F, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}.")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}.")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between feature sets ``real: (N, F)`` and ``fake: (M, F)``."""
    _check(real, fake)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_subset_size(n_real: int, n_fake: int, cap: int = 1000) -> int:
    """KID's subset size: torchmetrics' default 1000, or half the smaller set below that (at least 2), so that
    subsets of either set differ from one another."""
    return max(2, min(cap, min(n_real, n_fake) // 2))


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int | None = None,
                    seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset_size``, default :func:`kid_subset_size`)
    between ``real: (N, F)`` and ``fake: (M, F)``."""
    _check(real, fake)
    size = subset_size or kid_subset_size(len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": that is the point here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # torchmetrics draws the subsets with the global generator: fix it, and leave the caller's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
