"""Energy distance between two point sets: a sample-quality measure for low-dimensional data."""

from __future__ import annotations

import torch
from torch import Tensor


def _mean_pairwise_distance(a: Tensor, b: Tensor, exclude_diagonal: bool) -> Tensor:
    d = torch.cdist(a, b)
    if not exclude_diagonal:
        return d.mean()
    n = a.shape[0]
    return d.sum() / (n * (n - 1))


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` for ``x: (N, D)``, ``y: (M, D)``.

    Within-set terms exclude the diagonal (the unbiased U-statistic), so two independent sets from
    one distribution give values scattered around 0 rather than a positive bias.
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    return (2 * _mean_pairwise_distance(x, y, False) - _mean_pairwise_distance(x, x, True)
            - _mean_pairwise_distance(y, y, True)).float()
