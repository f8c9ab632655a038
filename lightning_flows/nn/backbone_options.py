"""A time-conditioned backbone's options, grouped (the arguments of :func:`lightning_flows.nn.make_time_backbone`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from lightning_flows.nn import BACKBONES, make_time_backbone


@dataclass
class TimeBackboneOptions:
    """Args:
        kind: ``auto`` (UNet for images, MLP for vectors), ``mlp`` or ``unet``.
        hidden, depth, activation: the MLP's width, hidden layers and activation.
        base_channels, channel_mults: the UNet's widths.
        time_scale: how far the sinusoidal time embeddings stretch t in [0, 1] (1000: the flow-matching and
            diffusion default). A smaller one makes the network smoother in time, which MeanFlow's target (a time
            derivative of the network) needs on the MLP, whose raw sinusoids feed every layer.
    """

    kind: str = "auto"
    hidden: int = 256
    depth: int = 3
    activation: str = "silu"
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    time_scale: float = 1000.0

    def __post_init__(self):
        if self.kind not in BACKBONES:
            raise ValueError(f"Unknown backbone kind '{self.kind}'. Choose one of: {', '.join(BACKBONES)}.")
        self.channel_mults = tuple(int(m) for m in self.channel_mults)

    def build(self, data_shape: Sequence[int], num_classes: int = 0, interval_time: bool = False) -> nn.Module:
        return make_time_backbone(data_shape, self.kind, hidden=self.hidden, depth=self.depth,
                                  base_channels=self.base_channels, channel_mults=self.channel_mults,
                                  activation=self.activation, num_classes=num_classes, interval_time=interval_time,
                                  time_scale=self.time_scale)


__all__ = ["TimeBackboneOptions"]
