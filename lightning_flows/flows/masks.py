"""Binary masks that choose which coordinates a coupling layer keeps (1) and transforms (0)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def checkerboard_mask(shape: Sequence[int], parity: int = 0) -> Tensor:
    """``(C, H, W)`` mask, 1 where ``(h + w + parity)`` is even, the same for every channel."""
    if len(shape) != 3:
        raise ValueError(f"checkerboard_mask needs an image shape (C, H, W), got {tuple(shape)}.")
    c, h, w = shape
    grid = (torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1) + parity) % 2 == 0
    return grid.float().expand(c, h, w).clone()


def channel_mask(shape: Sequence[int], parity: int = 0) -> Tensor:
    """``(C, H, W)`` mask keeping the first half of the channels (``parity=0``) or the second."""
    if len(shape) != 3 or shape[0] < 2:
        raise ValueError(f"channel_mask needs (C, H, W) with C >= 2, got {tuple(shape)}; squeeze first.")
    c, h, w = shape
    keep = torch.zeros(c)
    keep[: c // 2] = 1.0
    if parity:
        keep = 1.0 - keep
    return keep.view(c, 1, 1).expand(c, h, w).clone()


def vector_mask(dim: int, index: int) -> Tensor:
    """``(D,)`` mask number ``index`` of a cycle: even/odd coordinates, then first/second half.

    Alternating the two patterns lets every coordinate condition on every other within a few
    layers, for any ``D >= 2``.
    """
    if dim < 2:
        raise ValueError(f"a coupling layer needs at least 2 dimensions, got {dim}.")
    pattern, flip = divmod(index % 4, 2)
    ar = torch.arange(dim)
    keep = (ar % 2 == 0) if pattern == 0 else (ar < dim // 2)
    keep = keep.float()
    return 1.0 - keep if flip else keep


__all__ = ["checkerboard_mask", "channel_mask", "vector_mask"]
