"""Logit preprocessing (RealNVP): model space ``[-1, 1]`` -> logit space, as one more bijection.

The DataModule hands every family dequantised data in model space ``x in [-1, 1)``. Flows model
pixels better in logit space, so this layer maps ``y = (x + 1) / 2``, ``p = alpha + (1 - 2 alpha) y``,
``z = log p - log(1 - p)``. Its log-determinant is part of the flow, so the model's ``log_prob`` is
still a density *in model space* and bits/dim through the shared helper
(:func:`lightning_flows.metrics.bits_per_dim`, which subtracts the DataModule's own ``D log 2``)
stays correct: no family-side correction is needed or allowed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_flows.flows.base import Bijection, flatten_sum


class LogitPreprocess(Bijection):
    """``x in (-1, 1)`` -> ``logit(alpha + (1 - 2 alpha)(x + 1)/2)``; ``alpha`` keeps edges finite."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}.")
        self.alpha = alpha

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * (x + 1.0) / 2.0
        z = torch.log(p) - torch.log1p(-p)
        # d z / d x = (1 - 2 alpha) / 2 * 1 / (p (1 - p)), per coordinate.
        log_dz_dx = math.log((1.0 - 2.0 * self.alpha) / 2.0) - torch.log(p) - torch.log1p(-p)
        return z, flatten_sum(log_dz_dx)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        p = torch.sigmoid(z)
        return 2.0 * (p - self.alpha) / (1.0 - 2.0 * self.alpha) - 1.0


PREPROCESSING = ("auto", "logit", "none")


def preprocessing_layers(preprocess: str, data_shape: tuple[int, ...], alpha: float) -> list[Bijection]:
    """``auto`` = logit for images (data in [-1, 1]), nothing for vectors (data in R^d)."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"Unknown preprocess '{preprocess}'. Choose one of: {', '.join(PREPROCESSING)}.")
    if preprocess == "auto":
        preprocess = "logit" if len(data_shape) == 3 else "none"
    if preprocess == "logit" and len(data_shape) != 3:
        # Vectors (toy 2D) live on all of R^d: the logit of points outside [-1, 1] is NaN.
        raise ValueError(f"preprocess='logit' needs images in [-1, 1] of shape (C, H, W), got data_shape="
                         f"{tuple(data_shape)}; use preprocess: none for vector data.")
    return [LogitPreprocess(alpha)] if preprocess == "logit" else []


__all__ = ["LogitPreprocess", "PREPROCESSING", "preprocessing_layers"]
