"""Per-dimension distributions over the data's ``L`` quantisation levels, shared by the VAE decoder and
DDPM's ``L_0``.

Each function returns ``log P(k)`` elementwise (nats, not summed), for levels ``k`` on the cells of
:mod:`lightning_flows.data.quantisation` (level ``k`` owns ``[2k/L - 1, 2(k+1)/L - 1)`` in model space).
Summed over dimensions and passed through
:func:`lightning_flows.data.quantisation.piecewise_constant_log_density`, they become the model-space
log-density that :func:`lightning_flows.metrics.bits_per_dim` turns into ``-log2 P(k) / D``.

* :func:`discretized_logistic_log_prob`: a logistic's mass on each cell (PixelCNN++, Salimans et al.
  2017, with one logistic per dimension), the two edge cells open to -inf / +inf so the masses sum to 1.
* :func:`discretized_gaussian_log_prob`: the same with a Gaussian, DDPM's decoder ``p(x_0 | x_1)``
  (Ho et al. 2020, eq. 13).
* :func:`categorical_log_prob`: a free categorical over the levels from logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_flows.data.quantisation import bin_edges

# Smallest relative gap kept between the two CDF values of an interior cell; only reached by a scale
# so wide that the cell holds less than ~1e-12 of the mass, where it floors log P at about -28 nats.
_MIN_LOG_RATIO = 1e-12


def _discretized_log_prob(log_cdf: Callable[[Tensor], Tensor], k: Tensor, mean: Tensor, log_scale: Tensor,
                          levels: int) -> Tensor:
    """``log P(k)`` of a symmetric location-scale law with standard log-CDF ``log_cdf``, elementwise.

    Interior cells: ``F(z_hi) - F(z_lo)``, evaluated on the side of the mean where both CDF values are
    small (by the symmetry ``F(z_hi) - F(z_lo) = F(-z_lo) - F(-z_hi)``) and in log space,
    ``log F(a) + log(1 - F(b) / F(a))``, so that neither a cell far in a tail nor a very narrow law
    loses precision. Edge cells are open: ``F(z_hi)`` for ``k = 0`` and ``1 - F(z_lo)`` for ``k = L - 1``.
    Every branch stays finite, so masking with ``where`` never leaks a NaN into the gradient.
    """
    lower, upper = bin_edges(k, levels, mean.dtype)
    inv_scale = torch.exp(-log_scale)
    z_lo, z_hi = (lower - mean) * inv_scale, (upper - mean) * inv_scale
    flip = (z_lo + z_hi) > 0
    a, b = torch.where(flip, -z_lo, z_hi), torch.where(flip, -z_hi, z_lo)  # a > b, and a + b <= 0
    log_fa = log_cdf(a)
    interior = log_fa + torch.log(-torch.expm1((log_cdf(b) - log_fa).clamp(max=-_MIN_LOG_RATIO)))
    first, last = log_cdf(z_hi), log_cdf(-z_lo)
    return torch.where(k <= 0, first, torch.where(k >= levels - 1, last, interior))


def discretized_logistic_log_prob(k: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """``log P(k)`` under a logistic with location ``mean`` and scale ``exp(log_scale)`` in model space,
    discretised onto the ``levels`` cells (edge cells open). Broadcasting; ``k`` long in ``0..L-1``."""
    return _discretized_log_prob(F.logsigmoid, k, mean, log_scale, levels)


def discretized_gaussian_log_prob(k: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """``log P(k)`` under ``N(mean, exp(log_scale)^2)`` in model space, discretised onto the ``levels``
    cells (edge cells open): DDPM's eq. 13. Broadcasting; ``k`` long in ``0..L-1``."""
    return _discretized_log_prob(torch.special.log_ndtr, k, mean, log_scale, levels)


def categorical_log_prob(logits: Tensor, k: Tensor) -> Tensor:
    """``log softmax(logits)[k]``: ``logits: (..., L)``, ``k: (...)`` long -> ``(...)``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, k.unsqueeze(-1)).squeeze(-1)
