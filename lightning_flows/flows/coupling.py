"""RealNVP's affine coupling layer (the lecture's formula) with a bounded scale, and its conditioners.

Lecture: ``v1 = u1``, ``v2 = u2 * exp(s(u1)) + t(u1)``, ``log|det J| = sum_i s_i(u1)``, inverse
``u2 = (v2 - t(v1)) * exp(-s(v1))``. Which coordinates form ``u1`` is given by a binary mask
(checkerboard or channel for images, alternating for vectors).

Stability (the lecture's "training instability ... aggressive scaling"): the raw network output is
squashed, ``s = scale_bound * tanh(raw / scale_bound)``, so a single layer can never stretch a
coordinate by more than ``exp(scale_bound)``; the conditioner's last layer starts at zero, so every
coupling starts as the identity.

Conditional couplings (``context_dim > 0``, e.g. a one-hot class label): the conditioner computes
``(s, t) = NN(u1, c)``, the context projected by a linear map and added to every hidden layer, before its
activation. For a fixed ``c`` the layer is the same triangular bijection of ``x`` with the same log-determinant,
so likelihoods stay exact given ``c``. The projection starts at zero (and draws no random numbers), so a
conditional coupling starts as the unconditional one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flows.flows.base import Bijection, flatten_sum, with_context
from lightning_flows.nn.mlp import make_activation


class ContextProjection(nn.Module):
    """``context: (B, C_ctx)`` -> a ``(B, hidden)`` shift of a hidden layer, broadcast over any trailing
    (spatial) dimensions of ``like``. Zero-initialised: the network starts blind to the context."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.context_dim = context_dim
        # A bare zero parameter, not nn.Linear (whose random init would shift every later layer's draws).
        self.weight = nn.Parameter(torch.zeros(hidden, context_dim))

    def forward(self, context: Tensor | None, like: Tensor) -> Tensor:
        if context is None or context.shape != (like.shape[0], self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this conditional coupling needs a context of shape ({like.shape[0]}, "
                             f"{self.context_dim}), got {got}; pass the labels the flow was built for.")
        shift = F.linear(context.to(like.dtype), self.weight)
        return shift.view(*shift.shape, *([1] * (like.ndim - 2)))


def context_projections(body: nn.Sequential, context_dim: int) -> nn.ModuleList | None:
    """One :class:`ContextProjection` per linear/conv layer of ``body`` (None without a context)."""
    if not context_dim:
        return None
    return nn.ModuleList(ContextProjection(context_dim, layer.out_features if isinstance(layer, nn.Linear)
                                           else layer.out_channels)
                         for layer in body if isinstance(layer, (nn.Linear, nn.Conv2d)))


def _conditioned_body(body: nn.Sequential, projections: nn.ModuleList | None, x: Tensor,
                      context: Tensor | None) -> Tensor:
    """``body`` (linear/conv layers and activations) with the projected context added to the output of each
    linear/conv layer, before its activation."""
    if projections is None:
        if context is not None:
            raise ValueError("this coupling was built without a context (context_dim=0) but was given one.")
        return body(x)
    shifts = iter(projections)
    for layer in body:
        x = layer(x)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            x = x + next(shifts)(context, x)
    return x


class MLPConditioner(nn.Module):
    """``(B, D) [, context (B, C_ctx)] -> (B, P*D)``: ``P`` raw numbers per coordinate (affine: scale and shift,
    ``P = 2``)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 2, activation: str = "silu",
                 params_per_dim: int = 2, context_dim: int = 0):
        super().__init__()
        widths = [dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), make_activation(activation)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(widths[-1], params_per_dim * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.context = context_projections(self.body, context_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.out(_conditioned_body(self.body, self.context, x, context))


class ConvConditioner(nn.Module):
    """``(B, C, H, W) [, context (B, C_ctx)] -> (B, P*C, H, W)``: Glow's 3x3 -> 1x1 -> 3x3 network, ``depth``
    hidden 1x1 layers, ``P`` raw numbers per channel and pixel (affine: ``P = 2``)."""

    def __init__(self, channels: int, hidden: int = 64, depth: int = 1, activation: str = "relu",
                 params_per_dim: int = 2, context_dim: int = 0):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 3, padding=1), make_activation(activation)]
        for _ in range(depth):
            layers += [nn.Conv2d(hidden, hidden, 1), make_activation(activation)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(hidden, params_per_dim * channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.context = context_projections(self.body, context_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.out(_conditioned_body(self.body, self.context, x, context))


def bounded_scale(raw: Tensor, bound: float) -> Tensor:
    """``bound * tanh(raw / bound)``: slope 1 at 0, never beyond ``+-bound`` (``bound <= 0``: unbounded)."""
    return bound * torch.tanh(raw / bound) if bound > 0 else raw


class AffineCoupling(Bijection):
    """Affine coupling ``z = m*x + (1-m)*(x*exp(s) + t)`` with ``(s, t) = conditioner(m*x)``.

    Args:
        mask: ``(*shape)`` of 0/1, 1 = kept (``u1``, conditions the rest), 0 = transformed (``u2``).
        conditioner: maps ``(B, *shape)`` [and a context ``(B, C_ctx)``] to ``(B, 2*shape[0], *shape[1:])``
            (raw s, then t).
        scale_bound: ``|s| <= scale_bound`` per coordinate (see :func:`bounded_scale`).
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, scale_bound: float = 2.0):
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.conditioner = conditioner
        self.scale_bound = scale_bound

    def _scale_shift(self, kept: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raw = with_context(self.conditioner, "forward", kept, context)
        raw_s, t = raw.chunk(2, dim=1)
        free = 1.0 - self.mask
        # Multiplying by (1 - mask) makes the kept coordinates an exact identity (s = t = 0 there).
        return bounded_scale(raw_s, self.scale_bound) * free, t * free

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept = x * self.mask
        s, t = self._scale_shift(kept, context)
        z = kept + (1.0 - self.mask) * (x * torch.exp(s) + t)
        return z, flatten_sum(s)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        kept = z * self.mask
        s, t = self._scale_shift(kept, context)
        return kept + (1.0 - self.mask) * ((z - t) * torch.exp(-s))


__all__ = ["AffineCoupling", "ContextProjection", "ConvConditioner", "MLPConditioner", "bounded_scale"]
