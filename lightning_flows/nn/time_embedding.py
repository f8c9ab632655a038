"""Sinusoidal embedding of a scalar time ``t`` (diffusion steps or ODE time)."""

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
