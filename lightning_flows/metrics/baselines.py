"""Reference likelihoods that need no training: what any model of discrete images must beat.

The independent-pixel model fits one categorical distribution over the ``L`` levels per dimension
(add-``alpha`` / Laplace smoothing of the training counts) and ignores every dependence between
pixels: ``P(k) = prod_d P_d(k_d)``. A generative model whose bits/dim is not below it has learned
nothing about the images' structure. Pure functions: integer level tensors in, numbers out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flows.data.quantisation import piecewise_constant_log_density, unit_cube_to_model_space_log_det
from lightning_flows.metrics.bits_per_dim import bits_per_dim


def _check_levels(name: str, values: Tensor, levels: int) -> None:
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer levels 0..{levels - 1}, got dtype {values.dtype}; pass the "
                        f"DataModule's raw splits (dm.splits.train / dm.splits.test), not model-space tensors.")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= levels):
        raise ValueError(f"{name} has levels outside 0..{levels - 1} (min {int(values.min())}, "
                         f"max {int(values.max())}); check `levels`.")


def independent_pixel_log_prob(train: Tensor, test: Tensor, levels: int, alpha: float = 1.0) -> Tensor:
    """``log P(k)`` in nats of each test example under per-dimension categoricals fitted on ``train``.

    ``train: (N, *shape)``, ``test: (M, *shape)`` integer levels in ``0..L-1`` -> ``(M,)``.
    ``P_d(k) = (count_d(k) + alpha) / (N + alpha L)``; ``alpha = 1`` is Laplace's add-one rule.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (add-alpha smoothing keeps unseen levels possible), got {alpha}.")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train examples have shape {tuple(train.shape[1:])} but test examples "
                         f"{tuple(test.shape[1:])}.")
    _check_levels("train", train, levels)
    _check_levels("test", test, levels)
    flat_train, flat_test = train.reshape(train.shape[0], -1).long(), test.reshape(test.shape[0], -1).long()
    dim = flat_train.shape[1]
    counts = torch.zeros(dim, levels, dtype=torch.float64)
    counts.scatter_add_(1, flat_train.T, torch.ones(flat_train.T.shape, dtype=torch.float64))
    log_probs = torch.log((counts + alpha) / (flat_train.shape[0] + alpha * levels))  # (D, L)
    return log_probs.gather(1, flat_test.T).sum(0)


def independent_pixel_bits_per_dim(train: Tensor, test: Tensor, levels: int, alpha: float = 1.0) -> float:
    """Mean bits/dim of ``test`` under the independent-pixel model fitted on ``train``: ``-log2 P(k) / D``,
    through the same :func:`bits_per_dim` as every model (the discrete ``P`` as a model-space density)."""
    dim = test[0].numel()
    log_density = piecewise_constant_log_density(independent_pixel_log_prob(train, test, levels, alpha), dim, levels)
    return float(bits_per_dim(-log_density.mean(), dim, levels, unit_cube_to_model_space_log_det(dim)))
