"""DCGAN-style convolutional networks and plain MLPs, shared by the VAE and the GAN.

``ConvEncoder`` maps an image to a feature vector (VAE encoder, GAN discriminator);
``ConvDecoder`` maps a vector to an image (VAE decoder, GAN generator). They mirror each other:
the encoder halves the resolution with 4x4 stride-2 convolutions while the size is even and
above 4 (8 -> 4, 28 -> 14 -> 7, 32 -> 16 -> 8 -> 4) and the decoder doubles it back with 4x4
stride-2 transposed convolutions, so any of the project's image sizes works without padding tricks.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

NORMS = ("batch", "none")


def downsampling_plan(height: int, width: int) -> int:
    """Number of stride-2 halvings a ``height x width`` image takes: halve while even and > 4."""
    n = 0
    while height % 2 == 0 and width % 2 == 0 and min(height, width) > 4:
        height, width, n = height // 2, width // 2, n + 1
    return max(n, 0)


def _maybe_sn(layer: nn.Module, use: bool) -> nn.Module:
    return _spectral_norm(layer) if use else layer


def _norm(kind: str, channels: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"Unknown norm '{kind}'. Choose one of: {', '.join(NORMS)}.")
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def make_mlp(in_dim: int, out_dim: int, hidden: int = 256, depth: int = 3, activation: str = "silu",
             spectral_norm: bool = False) -> nn.Sequential:
    """``(B, in_dim)`` -> ``(B, out_dim)`` with ``depth`` hidden layers; ``depth=0`` is one linear map."""
    from lightning_flows.nn.mlp import make_activation

    widths = [in_dim] + [hidden] * depth + [out_dim]
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(_maybe_sn(nn.Linear(w_in, w_out), spectral_norm))
        if i < len(widths) - 2:
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


def require_image_shape(network: str, data_shape: Sequence[int]) -> None:
    """Raise naming the vector alternative when ``data_shape`` is not an image shape ``(C, H, W)``."""
    if len(data_shape) != 3:
        raise ValueError(f"{network} needs images of shape (C, H, W), got {tuple(data_shape)}; "
                         f"use an MLP (`network: mlp`) for vector data.")


class ConvEncoder(nn.Module):
    """``x: (B, C, H, W)`` -> ``(B, out_features)``.

    Strided 4x4 convolutions with LeakyReLU (DCGAN's discriminator), optional batch norm after
    every convolution but the first, optional spectral norm on every layer, then a linear head.
    """

    def __init__(self, data_shape: Sequence[int], out_features: int, base_channels: int = 32,
                 norm: str = "none", spectral_norm: bool = False, max_channels: int = 256):
        super().__init__()
        require_image_shape("ConvEncoder", data_shape)
        c, h, w = data_shape
        n_down = downsampling_plan(h, w)
        layers: list[nn.Module] = [_maybe_sn(nn.Conv2d(c, base_channels, 3, padding=1), spectral_norm),
                                   nn.LeakyReLU(0.2)]
        ch = base_channels
        for _ in range(n_down):
            out = min(ch * 2, max_channels)
            layers += [_maybe_sn(nn.Conv2d(ch, out, 4, stride=2, padding=1), spectral_norm),
                       _norm(norm, out), nn.LeakyReLU(0.2)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.flat_features = ch * (h >> n_down) * (w >> n_down)
        self.head = _maybe_sn(nn.Linear(self.flat_features, out_features), spectral_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """``z: (B, in_features)`` -> ``(B, out_channels, H, W)`` (DCGAN's generator, mirrored encoder).

    A linear map to a ``(channels, H / 2^n, W / 2^n)`` tensor, then ``n`` 4x4 stride-2 transposed
    convolutions with norm + ReLU, then a 3x3 convolution to ``out_channels``. No output
    non-linearity: the caller decides (tanh for a GAN, none for a Gaussian mean).
    """

    def __init__(self, in_features: int, data_shape: Sequence[int], base_channels: int = 32,
                 out_channels: int | None = None, norm: str = "batch", max_channels: int = 256):
        super().__init__()
        require_image_shape("ConvDecoder", data_shape)
        c, h, w = data_shape
        n_down = downsampling_plan(h, w)
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(n_down + 1)]
        self.start_shape = (widths[-1], h >> n_down, w >> n_down)
        self.project = nn.Sequential(nn.Linear(in_features, math.prod(self.start_shape)), nn.ReLU())
        layers: list[nn.Module] = []
        for i in reversed(range(n_down)):
            layers += [nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1),
                       _norm(norm, widths[i]), nn.ReLU()]
        layers.append(nn.Conv2d(widths[0], out_channels or c, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).reshape(z.shape[0], *self.start_shape))
