"""Neural spline flows (Durkan et al. 2019): the monotonic rational-quadratic spline and its coupling.

On ``[-B, B]`` each transformed coordinate goes through a monotonic piecewise rational-quadratic
function with ``K`` bins: knots ``(x_k, y_k)`` with ``x_0 = y_0 = -B``, ``x_K = y_K = B`` and
positive derivatives ``d_k`` at the knots. In bin ``k``, with ``w_k, h_k`` its width and height,
``s_k = h_k / w_k`` and ``xi = (x - x_k) / w_k`` in ``[0, 1)``:

    y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))
    dy/dx = s_k^2 (d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))^2

(the paper's eqs. 4 and 5), strictly increasing, and inverted exactly by the root of a quadratic
(eqs. 6-8). Outside ``[-B, B]`` it is the identity (the "linear tails"); the boundary derivatives
are fixed to 1 so the map is C^1 there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flows.flows.base import Bijection, with_context

# Floors on the bins and slopes: keep the spline strictly monotone and its log-derivative finite.
MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def spline_params_per_dim(bins: int) -> int:
    """Raw numbers per transformed coordinate: ``K`` widths, ``K`` heights, ``K - 1`` interior slopes."""
    return 3 * bins - 1


def _knots(raw: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """``raw: (..., K)`` -> bin sizes ``(..., K)`` summing to ``2B`` and knot positions ``(..., K + 1)``."""
    bins = raw.shape[-1]
    if min_size * bins >= 1.0:
        raise ValueError(f"{bins} bins with a minimum bin size of {min_size} do not fit in the interval; "
                         f"use fewer bins.")
    # softmax by hand: torch.softmax over a short last dimension takes a slow CPU path (~10x here).
    exp = (raw - raw.detach().amax(dim=-1, keepdim=True)).exp()
    fractions = min_size + (1.0 - min_size * bins) * exp / exp.sum(dim=-1, keepdim=True)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0), value=0.0) * (2.0 * bound) - bound
    # Pin the ends exactly (the cumulative sum drifts by rounding), then derive sizes from the knots
    # so that bins and knots agree to the last bit.
    knots[..., 0], knots[..., -1] = -bound, bound
    return knots[..., 1:] - knots[..., :-1], knots


# softplus(raw + _IDENTITY_SHIFT) + MIN_DERIVATIVE == 1 at raw == 0: a zero-initialised conditioner gives
# slope 1 at every knot and equal bins, i.e. the identity.
_IDENTITY_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _derivatives(raw: Tensor) -> Tensor:
    """``raw: (..., K - 1)`` -> knot slopes ``(..., K + 1)``, 1 at both ends (linear tails)."""
    inner = MIN_DERIVATIVE + F.softplus(raw + _IDENTITY_SHIFT)
    return F.pad(inner, (1, 1), value=1.0)


def rational_quadratic_spline(inputs: Tensor, raw_widths: Tensor, raw_heights: Tensor, raw_derivatives: Tensor,
                              bound: float, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Monotonic rational-quadratic spline on ``[-bound, bound]``, identity outside.

    Args:
        inputs: ``(...)`` points (``x`` forward, ``y`` with ``inverse``).
        raw_widths, raw_heights: ``(..., K)`` unnormalised bin sizes (softmax-normalised here).
        raw_derivatives: ``(..., K - 1)`` unnormalised interior knot slopes (softplus here).
        bound: ``B``, half the width of the spline's interval.
        inverse: evaluate ``x = g^{-1}(y)`` instead of ``y = g(x)``.

    Returns:
        ``(outputs, log|d outputs / d inputs|)``, both shaped like ``inputs``.
    """
    if raw_widths.shape[-1] != raw_heights.shape[-1] or raw_derivatives.shape[-1] != raw_widths.shape[-1] - 1:
        raise ValueError(f"a K-bin spline needs K widths, K heights and K - 1 derivatives; got "
                         f"{raw_widths.shape[-1]}, {raw_heights.shape[-1]}, {raw_derivatives.shape[-1]}.")
    inside = (inputs >= -bound) & (inputs <= bound)
    # Evaluate the spline on clamped inputs so that points in the tails never produce inf/NaN
    # (which would poison the gradient through torch.where even where unselected).
    x = inputs.clamp(-bound, bound)
    widths, x_knots = _knots(raw_widths, bound, MIN_BIN_WIDTH)
    heights, y_knots = _knots(raw_heights, bound, MIN_BIN_HEIGHT)
    derivatives = _derivatives(raw_derivatives)

    search = y_knots if inverse else x_knots
    # Bin k holds [knot_k, knot_{k+1}); the right end B belongs to the last bin.
    index = torch.searchsorted(search[..., 1:-1].contiguous(), x[..., None].contiguous(), right=True)
    # One gather for everything bin k needs: (..., K, 6) -> (..., 6).
    per_bin = torch.stack([x_knots[..., :-1], y_knots[..., :-1], widths, heights, derivatives[..., :-1],
                           derivatives[..., 1:]], dim=-1)
    x_k, y_k, w_k, h_k, d_k, d_k1 = per_bin.gather(-2, index[..., None].expand(*index.shape, 6)).squeeze(-2).unbind(-1)
    slope = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * slope

    if inverse:
        dy = x - y_k
        a = h_k * (slope - d_k) + dy * curvature
        b = h_k * d_k - dy * curvature
        c = -slope * dy
        discriminant = (b.pow(2) - 4.0 * a * c).clamp_min(0.0)
        # The numerically stable root (no cancellation), in [0, 1] for a monotone bin.
        xi = (2.0 * c) / (-b - discriminant.sqrt())
    else:
        xi = (x - x_k) / w_k
    xi_1m = xi * (1 - xi)
    denominator = slope + curvature * xi_1m
    outputs = xi * w_k + x_k if inverse else y_k + h_k * (slope * xi.pow(2) + d_k * xi_1m) / denominator
    numerator = slope.pow(2) * (d_k1 * xi.pow(2) + 2.0 * slope * xi_1m + d_k * (1 - xi).pow(2))
    log_derivative = numerator.log() - 2.0 * denominator.log()  # log dy/dx at the point
    if inverse:
        log_derivative = -log_derivative
    outputs = torch.where(inside, outputs, inputs)
    return outputs, torch.where(inside, log_derivative, torch.zeros_like(log_derivative))


class SplineCoupling(Bijection):
    """Rational-quadratic spline coupling: ``z = m*x + (1-m)*g_theta(x)`` with ``theta = conditioner(m*x)``.

    Args:
        mask: ``(*shape)`` of 0/1, 1 = kept (conditions the rest), 0 = transformed.
        conditioner: maps ``(B, *shape)`` [and a context ``(B, C_ctx)``] to ``(B, shape[0] * (3K - 1),
            *shape[1:])``: for every channel (or vector coordinate) its ``K`` widths, ``K`` heights and ``K - 1``
            slopes.
            A zero-initialised last layer makes the layer the identity at start.
        bins: ``K``.
        bound: ``B``: the spline acts on ``[-B, B]``, the identity outside.
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, bins: int = 8, bound: float = 3.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"a spline needs at least 2 bins, got bins={bins}.")
        if bound <= 0:
            raise ValueError(f"the spline interval [-bound, bound] needs bound > 0, got {bound}.")
        self.register_buffer("mask", mask.clone())
        # Only the transformed coordinates go through the spline (half the work of the whole tensor).
        self.register_buffer("free_index", torch.nonzero(mask.reshape(-1) == 0).reshape(-1), persistent=False)
        self.conditioner = conditioner
        self.bins, self.bound = bins, bound

    def _transform(self, x: Tensor, inverse: bool, context: Tensor | None) -> tuple[Tensor, Tensor]:
        b, per = x.shape[0], spline_params_per_dim(self.bins)
        kept = x * self.mask
        raw = with_context(self.conditioner, "forward", kept, context)
        # (B, C * per, *spatial) -> (B, C, *spatial, per) -> (B, D, per): the spline's parameters last.
        raw = raw.reshape(b, x.shape[1], per, *x.shape[2:]).movedim(2, -1).reshape(b, -1, per)
        raw = raw[:, self.free_index]
        widths, heights, slopes = raw.split([self.bins, self.bins, self.bins - 1], dim=-1)
        flat = x.reshape(b, -1)
        out, log_derivative = rational_quadratic_spline(flat[:, self.free_index], widths, heights, slopes,
                                                        self.bound, inverse)
        return flat.index_copy(1, self.free_index, out).reshape(x.shape), log_derivative.sum(dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(x, False, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self._transform(z, True, context)[0]


__all__ = ["SplineCoupling", "rational_quadratic_spline", "spline_params_per_dim"]
