"""Squeeze and the multi-scale split (RealNVP/Glow): volume-preserving reshapes and factoring out.

``Squeeze`` trades space for channels, ``(B, C, H, W) -> (B, 4C, H/2, W/2)`` (log-det 0), so that
channel-wise couplings and 1x1 convolutions can mix neighbouring pixels. ``FactorOut`` is the
multi-scale split: half of the channels leave the flow (they go straight to the base distribution)
and only the other half is transformed further by an inner flow. Writing the factored half back in
place keeps every layer shape-preserving, so a whole multi-scale model is one bijection
``(B, C, H, W) -> (B, C, H, W)`` whose output is the concatenated latent.
"""

from __future__ import annotations

from torch import Tensor
import torch

from lightning_flows.flows.base import Bijection, with_context, zero_log_det


class Squeeze(Bijection):
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: each 2x2 patch becomes 4 channels; log-det 0."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Squeeze needs (B, C, H, W) with even H and W, got {tuple(x.shape)}; "
                             f"use fewer multi-scale levels (each level halves H and W).")
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2), zero_log_det(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        b, c4, h, w = z.shape
        c = c4 // 4
        z = z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c, 2 * h, 2 * w)


class Unsqueeze(Bijection):
    """The inverse of :class:`Squeeze`: ``(B, 4C, H, W) -> (B, C, 2H, 2W)``; log-det 0."""

    def __init__(self):
        super().__init__()
        self.squeeze = Squeeze()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze.inverse(x), zero_log_det(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.squeeze(z)[0]


class Reshape(Bijection):
    """``(B, *in_shape) <-> (B, *out_shape)``, e.g. flattening an image for MLP couplings; log-det 0."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], *self.out_shape), zero_log_det(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return z.reshape(z.shape[0], *self.in_shape)


class FactorOut(Bijection):
    """Multi-scale split: ``inner`` transforms the first ``keep`` channels, the rest pass through.

    The passed-through channels are final latents (the base density scores them); a learned,
    Glow-style prior for them is an affine coupling conditioned on the kept half placed just before
    this layer. ``x: (B, C, H, W)`` -> ``(B, C, H', W')`` when ``inner`` preserves shape.
    """

    def __init__(self, inner: Bijection, keep: int):
        super().__init__()
        self.inner, self.keep = inner, keep

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, out = x[:, : self.keep], x[:, self.keep:]
        z_kept, log_det = with_context(self.inner, "forward", kept, context)
        return torch.cat([z_kept, out], dim=1), log_det

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        z_kept, out = z[:, : self.keep], z[:, self.keep:]
        return torch.cat([with_context(self.inner, "inverse", z_kept, context), out], dim=1)


__all__ = ["Squeeze", "Unsqueeze", "Reshape", "FactorOut"]
