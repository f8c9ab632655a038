"""Time-conditioned MLP for vector data: a velocity / noise / score network ``f(x, t)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_flows.nn.class_conditioning import ClassEmbedding
from lightning_flows.nn.time_embedding import IntervalEmbedding, SinusoidalTimeEmbedding, add_interval, broadcast_time

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "relu": nn.ReLU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation '{name}'. Choose one of: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


class TimeMLP(nn.Module):
    """``f(x, t[, y])`` with ``x: (B, D)``, ``t`` scalar or ``(B,)`` -> ``(B, D)``.

    The time embedding is concatenated to the input of every hidden layer, which keeps the field
    strongly time-dependent even when deep (a single input concat fades with depth). With
    ``num_classes > 0`` a learned class embedding (index ``num_classes``: the null class, also used when
    ``y`` is None) is added to it; ``num_classes = 0`` builds exactly the unconditional network.
    ``interval_time=True`` adds a second time input ``interval`` (MeanFlow's ``b - a``), embedded sinusoidally,
    mapped by a learned linear layer (so the two times stay distinguishable) and added to the time embedding;
    ``False`` builds exactly the one-time network. ``time_scale``: the sinusoids' time stretch (see
    :class:`SinusoidalTimeEmbedding`); the raw sinusoids feed every layer here, so the field's time derivative
    grows with it (MeanFlow's target differentiates in time and wants a smaller one).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 32,
                 activation: str = "silu", out_dim: int | None = None, num_classes: int = 0,
                 interval_time: bool = False, time_scale: float = 1000.0):
        super().__init__()
        self.dim = dim
        self.time_embed = SinusoidalTimeEmbedding(time_dim, scale=time_scale)
        if num_classes:
            self.class_embed = ClassEmbedding(num_classes, time_dim)
        widths = [dim] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(w + time_dim, hidden) for w in widths[:-1])
        self.act = make_activation(activation)
        self.out = nn.Linear(hidden + time_dim, out_dim or dim)
        if interval_time:  # created last: the one-time network's initialisation is unchanged
            self.interval_embed = IntervalEmbedding(time_dim, nn.Linear(time_dim, time_dim), scale=time_scale)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                interval: Tensor | float | None = None) -> Tensor:
        emb = self.time_embed(broadcast_time(t, x.shape[0], x))
        if hasattr(self, "class_embed"):
            emb = emb + self.class_embed(y, x.shape[0], x.device)
        elif y is not None:
            raise ValueError("this network is unconditional (num_classes=0) and takes no labels.")
        emb = add_interval(self, emb, interval, x)
        h = x
        for layer in self.hidden:
            h = self.act(layer(torch.cat([h, emb], dim=-1)))
        return self.out(torch.cat([h, emb], dim=-1))
