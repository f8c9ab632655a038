"""Smooth vector fields ``f(x, t)`` for continuous normalizing flows.

A CNF is only as cheap as its ODE is easy to solve: an adaptive solver's step count grows with how
fast ``f`` varies in ``x`` *and* in ``t``. So these fields take the raw scalar ``t`` (no
high-frequency sinusoidal embedding, which makes the field oscillate in time and multiplies the
NFE) and use smooth activations (softplus / tanh; the exact trace differentiates them once more,
so ReLU's zero second derivative would also starve the likelihood gradient).

* :class:`ConcatSquashMLP` for vectors ``(B, D)`` (FFJORD's concat-squash layer:
  ``h' = (W h + b) * sigmoid(a(t)) + c(t)``: time gates and shifts every layer).
* :class:`ConcatConvField` for images ``(B, C, H, W)``: 3x3 convolutions with ``t`` appended as a
  constant input channel at every layer; no normalisation layers, so examples stay independent
  (the exact trace relies on that).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_flows.nn.mlp import make_activation
from lightning_flows.nn.time_embedding import broadcast_time


class ConcatSquashLinear(nn.Module):
    """``(W x + b) * sigmoid(g t + g0) + (s t)``: ``x: (B, in)``, ``t: (B,)`` -> ``(B, out)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t[:, None]
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


class ConcatSquashMLP(nn.Module):
    """A smooth time-dependent field on vectors of any shape: ``(B, *shape)`` -> ``(B, *shape)``.

    Args:
        data_shape: shape of one example (flattened internally, so ``(1, 8, 8)`` works too).
        hidden: width; depth: number of hidden layers; activation: ``softplus`` or ``tanh`` advised.
    """

    def __init__(self, data_shape: Sequence[int], hidden: int = 64, depth: int = 3, activation: str = "softplus"):
        super().__init__()
        self.data_shape = tuple(data_shape)
        dim = 1
        for s in self.data_shape:
            dim *= s
        widths = [dim] + [hidden] * depth + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = broadcast_time(t, x.shape[0], x)
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            h = layer(h, t)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h.reshape(x.shape)


class ConcatConvField(nn.Module):
    """A smooth time-dependent field on images: ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Every layer is a same-size 3x3 convolution of ``[h, t]`` (``t`` as a constant channel), so the
    receptive field grows by 2 pixels per layer; ``depth`` hidden layers of ``channels`` channels.
    """

    def __init__(self, data_shape: Sequence[int], channels: int = 32, depth: int = 3, activation: str = "softplus"):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"ConcatConvField needs image data of shape (C, H, W), got {tuple(data_shape)}; "
                             f"use field: mlp for vector data.")
        c = data_shape[0]
        widths = [c] + [channels] * depth + [c]
        self.convs = nn.ModuleList(nn.Conv2d(a + 1, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = broadcast_time(t, x.shape[0], x)
        t_channel = t[:, None, None, None].expand(x.shape[0], 1, *x.shape[2:])
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(torch.cat([h, t_channel], dim=1))
            if i < len(self.convs) - 1:
                h = self.act(h)
        return h
