"""Backbones shared across families: time-conditioned MLP and UNet, and a factory choosing one."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from lightning_flows.nn.mlp import TimeMLP
from lightning_flows.nn.time_embedding import SinusoidalTimeEmbedding, broadcast_time
from lightning_flows.nn.unet import TimeUNet

BACKBONES = ("auto", "mlp", "unet")


def make_time_backbone(data_shape: Sequence[int], backbone: str = "auto", hidden: int = 256, depth: int = 3,
                       base_channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2),
                       activation: str = "silu", num_classes: int = 0, interval_time: bool = False,
                       time_scale: float = 1000.0) -> nn.Module:
    """A network ``f(x, t[, y])`` mapping ``x: (B, *data_shape)`` to the same shape.

    ``backbone="auto"`` picks the UNet for images ``(C, H, W)`` and the MLP for vectors ``(D,)``.
    ``num_classes > 0`` adds a class embedding (labels ``y: (B,)``; ``num_classes`` or None = the null class).
    ``interval_time`` adds a second time input, ``f(x, t, y, interval=s)`` (MeanFlow's two times);
    ``time_scale`` stretches time in the sinusoidal embeddings (default 1000).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone '{backbone}'. Choose one of: {', '.join(BACKBONES)}.")
    if backbone == "auto":
        backbone = "unet" if len(data_shape) == 3 else "mlp"
    if backbone == "unet":
        return TimeUNet(data_shape, base_channels=base_channels, channel_mults=channel_mults, num_classes=num_classes,
                        interval_time=interval_time, time_scale=time_scale)
    return FlatTimeMLP(data_shape, hidden=hidden, depth=depth, activation=activation, num_classes=num_classes,
                       interval_time=interval_time, time_scale=time_scale)


class FlatTimeMLP(nn.Module):
    """:class:`TimeMLP` on flattened inputs of any shape: ``(B, *shape)`` -> ``(B, *shape)``."""

    def __init__(self, data_shape: Sequence[int], **mlp_kwargs):
        super().__init__()
        self.data_shape = tuple(data_shape)
        dim = 1
        for s in self.data_shape:
            dim *= s
        self.mlp = TimeMLP(dim, **mlp_kwargs)

    def forward(self, x, t, y=None, interval=None):
        return self.mlp(x.reshape(x.shape[0], -1), t, y, interval).reshape(x.shape)


__all__ = ["TimeMLP", "TimeUNet", "FlatTimeMLP", "SinusoidalTimeEmbedding", "broadcast_time",
           "make_time_backbone", "BACKBONES"]
