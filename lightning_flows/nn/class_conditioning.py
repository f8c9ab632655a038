"""Class conditioning of the time-conditioned backbones, and classifier-free guidance (Ho & Salimans 2022).

A conditional backbone ``f(x, t, y)`` embeds the label ``y`` in ``0..K-1`` beside the time; index ``K`` is a
learned *null class* standing for "no label", the unconditional branch. Training drops each label to the
null class with probability ``p`` (:func:`drop_labels`), so one network learns both ``f(x, t, y)`` and
``f(x, t, null)``. Sampling mixes them with the guidance weight ``w``::

    f_w(x, t, y) = f(x, t, null) + w (f(x, t, y) - f(x, t, null))

``w = 1`` is the conditional field, ``w = 0`` the unconditional one, ``w > 1`` pushes samples towards what
distinguishes the class. :func:`guided` evaluates both branches in ONE network call on the doubled batch
(conditional and null labels concatenated), so a guided step costs one forward, not two.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class ClassEmbedding(nn.Module):
    """Labels ``y: (B,)`` in ``0..num_classes`` (``num_classes`` = the null class) -> ``(B, dim)``; ``y=None``
    embeds the null class for the whole batch."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a class embedding needs num_classes >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if y.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) (one per example), got {tuple(y.shape)}.")
        return self.embed(y.to(device=device, dtype=torch.long))


def null_labels(n: int, num_classes: int, device=None) -> Tensor:
    """``(n,)`` labels all equal to the null class ``num_classes``."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device)


def drop_labels(y: Tensor, p: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """``y: (B,)`` with each label independently replaced by the null class with probability ``p``."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device if generator is None else "cpu") < p
    return torch.where(drop.to(y.device), torch.full_like(y, num_classes), y)


def guided(network: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, t: Tensor | float, y: Tensor,
           guidance: float, num_classes: int) -> Tensor:
    """``f(x, t, null) + w (f(x, t, y) - f(x, t, null))`` for ``x: (B, ...)``, ``y: (B,)``, ``t`` scalar or
    ``(B,)``, from one call of ``network`` on the batch of ``2B`` (conditional first, then null labels).

    ``w = 1`` and ``w = 0`` need only one branch, so they evaluate just that one (the result is the same).
    """
    if guidance == 1.0:
        return network(x, t, y)
    null = null_labels(x.shape[0], num_classes, y.device)
    if guidance == 0.0:
        return network(x, t, null)
    t2 = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim == 1 else t
    conditional, unconditional = network(torch.cat([x, x]), t2, torch.cat([y, null])).chunk(2)
    return unconditional + guidance * (conditional - unconditional)
