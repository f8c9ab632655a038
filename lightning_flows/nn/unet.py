"""A small time-conditioned UNet for images: ``f(x, t)`` with ``x: (B, C, H, W)`` -> ``(B, C, H, W)``.

Sized for 8x8 to 32x32 images on a CPU; shared by flow matching, diffusion and the conv CNF field.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flows.nn.class_conditioning import ClassEmbedding
from lightning_flows.nn.time_embedding import IntervalEmbedding, SinusoidalTimeEmbedding, add_interval, broadcast_time


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class TimeUNet(nn.Module):
    """UNet with one residual block per level, strided-conv downsampling and nearest upsampling.

    Args:
        data_shape: ``(C, H, W)`` of one image; ``H`` and ``W`` must be divisible by
            ``2 ** (len(channel_mults) - 1)``.
        base_channels: channels of the first level; level ``i`` has ``base_channels * channel_mults[i]``.
        num_classes: ``> 0`` adds a learned class embedding to the time embedding, ``f(x, t, y)``; index
            ``num_classes`` is the null class (also used when ``y`` is None). 0: the unconditional network.
        interval_time: a second time input ``interval`` (MeanFlow's ``b - a``) with its own embedding MLP, added
            to the time embedding; False builds exactly the one-time network.
        time_scale: the sinusoidal embeddings' time stretch (:class:`SinusoidalTimeEmbedding`).
    """

    def __init__(self, data_shape: Sequence[int], base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), time_dim: int = 128, dropout: float = 0.0,
                 out_channels: int | None = None, num_classes: int = 0, interval_time: bool = False,
                 time_scale: float = 1000.0):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(
                f"TimeUNet needs image data of shape (C, H, W), but the dataset gives shape "
                f"{tuple(data_shape)}. Use an MLP backbone for vector data (model `backbone: mlp`)."
            )
        c, h, w = data_shape
        factor = 2 ** (len(channel_mults) - 1)
        if h % factor or w % factor:
            raise ValueError(f"Image size {h}x{w} is not divisible by {factor}; use fewer channel_mults.")
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(time_dim, scale=time_scale),
                                        nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if num_classes:
            self.class_embed = ClassEmbedding(num_classes, time_dim)
        widths = [base_channels * m for m in channel_mults]
        self.inp = nn.Conv2d(c, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            self.down_blocks.append(ResBlock(prev, width, time_dim, dropout))
            prev = width
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.mid = ResBlock(prev, prev, time_dim, dropout)
        self.up_blocks = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            self.up_blocks.append(ResBlock(prev + width, width, time_dim, dropout))
            prev = width
            self.upsample.append(nn.Identity() if i == 0 else nn.Conv2d(width, widths[i - 1], 3, padding=1))
            if i > 0:
                prev = widths[i - 1]
        self.out_norm = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.out = nn.Conv2d(widths[0], out_channels or c, 3, padding=1)
        if interval_time:  # created last: the one-time network's initialisation is unchanged
            self.interval_embed = IntervalEmbedding(time_dim, nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(),
                                                                            nn.Linear(time_dim, time_dim)),
                                                 scale=time_scale)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                interval: Tensor | float | None = None) -> Tensor:
        emb = self.time_embed(broadcast_time(t, x.shape[0], x))
        if hasattr(self, "class_embed"):
            emb = emb + self.class_embed(y, x.shape[0], x.device)
        elif y is not None:
            raise ValueError("this network is unconditional (num_classes=0) and takes no labels.")
        emb = add_interval(self, emb, interval, x)
        h = self.inp(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, up in zip(self.up_blocks, self.upsample):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
