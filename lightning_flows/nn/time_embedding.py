"""Sinusoidal embedding of a scalar time ``t`` (diffusion steps or ODE time), and of a second time input."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def broadcast_time(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """Scalar, ``()`` or ``(B,)`` time -> ``(B,)`` on ``like``'s device and dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)


class SinusoidalTimeEmbedding(nn.Module):
    """``t: (B,)`` -> ``(B, dim)`` features ``[sin(w_k t), cos(w_k t)]`` with geometric ``w_k``.

    ``scale`` stretches t in [0, 1] so that the highest frequency resolves small time steps.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10_000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2) / (dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, t: Tensor) -> Tensor:
        args = (t * self.scale)[:, None] * self.freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class IntervalEmbedding(nn.Module):
    """A second time input (MeanFlow's interval ``b - a``): ``(B,)`` -> ``(B, dim)``, sinusoidal features mapped by
    ``head`` (a learned layer, so the backbone tells this time from its own ``t``)."""

    def __init__(self, dim: int, head: nn.Module, scale: float = 1000.0):
        super().__init__()
        self.sinusoidal = SinusoidalTimeEmbedding(dim, scale=scale)
        self.head = head

    def forward(self, interval: Tensor) -> Tensor:
        return self.head(self.sinusoidal(interval))


def add_interval(network: nn.Module, emb: Tensor, interval: Tensor | float | None, like: Tensor) -> Tensor:
    """``emb`` plus ``network.interval_embed(interval)`` for a backbone built with a second time input (which then
    requires it); a backbone without one refuses an interval."""
    if hasattr(network, "interval_embed"):
        if interval is None:
            raise ValueError("this network was built with a second time input (interval_time=True) and needs it.")
        return emb + network.interval_embed(broadcast_time(interval, like.shape[0], like))
    if interval is not None:
        raise ValueError("this network has one time input; build it with interval_time=True for a second one.")
    return emb
