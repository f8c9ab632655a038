"""A normalizing flow as a distribution: a bijection to latent space plus a base density.

``log p_x(x) = log p_z(f(x)) + log|det df/dx|`` (the lecture's change of variables, with ``f`` the
normalizing direction; see :mod:`lightning_flows.flows.base`). Sampling runs ``f^{-1}`` on base
draws, optionally at a temperature ``T`` (``z ~ N(0, T^2 I)``, Glow's trick for cleaner samples).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_flows.flows.base import Bijection, flatten_sum


class StandardNormal(nn.Module):
    """``N(0, I)`` over examples of shape ``shape``."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """``z: (B, *shape)`` -> ``(B,)`` nats."""
        return flatten_sum(-0.5 * z.pow(2)) - 0.5 * math.log(2 * math.pi) * math.prod(self.shape)

    def sample(self, n: int, temperature: float = 1.0, device=None, dtype=None) -> Tensor:
        return temperature * torch.randn(n, *self.shape, device=device, dtype=dtype)


class NormalizingFlow(nn.Module):
    """``bijection`` (data -> latent, shape-preserving) with a standard normal base.

    Args:
        bijection: the composed layers, ``(B, *shape) -> ((B, *shape), (B,))``.
        shape: shape of one example.
    """

    def __init__(self, bijection: Bijection, shape: Sequence[int]):
        super().__init__()
        self.bijection = bijection
        self.base = StandardNormal(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x -> (z, log|det dz/dx|)``."""
        return self.bijection(x)

    def inverse(self, z: Tensor) -> Tensor:
        return self.bijection.inverse(z)

    def log_prob(self, x: Tensor) -> Tensor:
        """``x: (B, *shape)`` -> ``(B,)`` exact log-density in nats."""
        z, log_det = self.bijection(x)
        return self.base.log_prob(z) + log_det

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        ref = next(self.parameters())
        z = self.base.sample(n, temperature, device=ref.device, dtype=ref.dtype)
        return self.bijection.inverse(z)


__all__ = ["StandardNormal", "NormalizingFlow"]
