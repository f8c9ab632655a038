"""Improved precision and recall (Kynkaenniemi et al. 2019): k-NN manifolds in feature space.

Each set's manifold is the union of balls around its points, the radius of a point's ball being the
distance to its k-th nearest neighbour within the same set. Precision is the fraction of generated
points inside the real manifold (are samples realistic?); recall the fraction of real points inside
the generated manifold (is the data covered?). Both lie in [0, 1]; two samples of one distribution
score close to 1 on both. The features are an extractor's (images) or the raw coordinates (2D data).
"""

from __future__ import annotations

import torch
from torch import Tensor


def knn_radii(points: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance of each point to its k-th nearest *other* point: ``(N, F)`` -> ``(N,)``."""
    if not 1 <= k < len(points):
        raise ValueError(f"k must be in [1, N-1] for N={len(points)} points, got k={k}.")
    radii = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], points)
        # The k+1-th smallest distance, since a point's nearest neighbour is itself (distance 0).
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def fraction_inside(queries: Tensor, centres: Tensor, radii: Tensor, chunk: int = 2048) -> float:
    """Fraction of ``queries: (M, F)`` within ``radii[j]`` of some ``centres[j]`` (``(N, F)``, ``(N,)``)."""
    inside = 0
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake: (M, F)`` against ``real: (N, F)`` with k-NN radius ``k``."""
    real, fake = real.double().flatten(1), fake.double().flatten(1)
    precision = fraction_inside(fake, real, knn_radii(real, k))
    recall = fraction_inside(real, fake, knn_radii(fake, k))
    return precision, recall
