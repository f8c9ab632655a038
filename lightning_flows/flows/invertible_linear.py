"""Glow's invertible 1x1 convolution, LU-parameterised: ``W = P L (U + diag(sign * exp(log_s)))``.

On images ``(B, C, H, W)`` it mixes channels at every pixel (a 1x1 convolution); on vectors
``(B, D)`` it is a dense invertible linear map (so Glow makes sense on 2D toy data too).
``log|det| = H*W*sum(log_s)`` costs O(C) instead of O(C^3), and ``W`` stays invertible for any
parameter values (``exp`` keeps the diagonal non-zero) -- the lecture's "poorly parameterized
invertible convs" avoided by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_flows.flows.base import Bijection


class InvertibleConv1x1(Bijection):
    """``z = W x`` over channel dim 1 with ``W: (C, C)`` built from its LU factors.

    Args:
        channels: ``C``.
        generator: seeds the random rotation ``W`` starts from (Glow's initialisation).
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        p, lower, upper = torch.linalg.lu(rotation)
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diag.abs()))

    @classmethod
    def from_matrix(cls, weight: Tensor) -> "InvertibleConv1x1":
        """A layer computing exactly ``z = weight @ x`` (``weight`` must be invertible)."""
        layer = cls(weight.shape[0])
        p, lower, upper = torch.linalg.lu(weight)
        diag = torch.diagonal(upper)
        if (diag == 0).any():
            raise ValueError("weight is singular; an invertible 1x1 convolution needs det(weight) != 0.")
        with torch.no_grad():
            layer.permutation.copy_(p)
            layer.sign_s.copy_(torch.sign(diag))
            layer.lower.copy_(lower)
            layer.upper.copy_(torch.triu(upper, 1))
            layer.log_s.copy_(torch.log(diag.abs()))
        return layer

    def matrix(self) -> Tensor:
        """The ``(C, C)`` matrix ``P L (U + diag(sign * exp(log_s)))``."""
        eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    @staticmethod
    def _matmul_channels(matrix: Tensor, x: Tensor) -> Tensor:
        return (matrix @ x.movedim(1, -1).unsqueeze(-1)).squeeze(-1).movedim(-1, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pixels = x[0, 0].numel()
        return self._matmul_channels(self.matrix(), x), (self.log_s.sum() * pixels).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self._matmul_channels(torch.linalg.inv(self.matrix()), z)


__all__ = ["InvertibleConv1x1"]
