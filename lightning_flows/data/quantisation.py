"""The geometry of quantised data in model space: one place for the bins every discrete likelihood uses.

Data with ``L`` levels ``k in {0..L-1}`` is dequantised and mapped affinely to model space::

    x = 2 (k + u) / L - 1,   u ~ U[0, 1)     so level k owns the cell [2k/L - 1, 2(k+1)/L - 1)

of width ``2 / L`` per dimension. A *discrete* model (a categorical or discretised decoder) assigns
a probability ``P(k)`` to every level vector; spread uniformly over its cell it is a piecewise-constant
*density* of the dequantised data in model space,

    log p(x) = log P(k(x)) - D log(2 / L) = log P(k(x)) + D log(L / 2),

which is what :func:`piecewise_constant_log_density` returns. Every family then hands the same kind
of number (a model-space log-density) to :func:`lightning_flows.metrics.bits_per_dim`, and for a discrete
model the bits/dim come out as exactly ``-log2 P(k) / D``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Keeps a point on a cell's lower edge (u = 0) in its own cell despite float32 rounding of x and of
# (x + 1) / 2 * L (at most ~1e-7 L levels); the price is that u within this of 1 reads as the next level.
_EDGE_TOLERANCE_PER_LEVEL = 2.0 ** -22


def dequantise(k: Tensor, noise: Tensor, levels: int) -> Tensor:
    """Integer levels ``k`` and uniform ``noise`` in [0, 1), any shape -> model space [-1, 1)."""
    return 2.0 * (k.to(noise.dtype) + noise) / levels - 1.0


def bin_index(x: Tensor, levels: int) -> Tensor:
    """The level ``k(x)`` whose cell holds ``x`` (model space, any shape) -> long tensor in ``0..L-1``;
    points outside [-1, 1] fall in the edge levels."""
    scaled = (x.clamp(-1, 1) + 1) / 2 * levels
    return torch.floor(scaled + levels * _EDGE_TOLERANCE_PER_LEVEL).clamp(0, levels - 1).long()


def bin_centre(k: Tensor, levels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Model-space centre ``2 (k + 1/2) / L - 1`` of level ``k``'s cell."""
    return dequantise(k, torch.full(k.shape, 0.5, dtype=dtype, device=k.device), levels)


def bin_edges(k: Tensor, levels: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Lower and upper model-space edges ``2k/L - 1`` and ``2(k+1)/L - 1`` of level ``k``'s cell.

    Finite for every level: discretised likelihoods open the two edge levels themselves (their
    ``first``/``last`` masks), so no infinity ever enters a gradient.
    """
    lower = 2.0 * k.to(dtype) / levels - 1.0
    return lower, lower + 2.0 / levels


def unit_cube_to_model_space_log_det(dim: int) -> float:
    """``log|det|`` of ``x = 2y - 1`` from the unit cube to model space, per example: ``D log 2``."""
    return dim * math.log(2.0)


def piecewise_constant_log_density(log_prob_levels: Tensor, dim: int, levels: int) -> Tensor:
    """``log P(k)`` (nats, summed over the ``dim`` dimensions) -> the model-space log-density of ``P``
    spread uniformly over the cells: ``log P(k) + D log(L / 2)``. Any shape."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    return log_prob_levels + dim * math.log(levels / 2.0)
