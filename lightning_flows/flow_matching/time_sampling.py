"""How training draws the time ``t`` of the path: uniform (the lecture) or logit-normal.

Logit-normal (Esser et al. 2024, "Scaling rectified flow transformers"): ``t = sigmoid(m + s * n)``
with ``n ~ N(0, 1)``; it puts more of the training signal in the middle of the path, where the
velocity is hardest to predict, and less near the ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimeSampler:
    """Draws ``t: (n,)`` in [0, 1]. ``mean``/``std``: the logit-normal's location and scale."""

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.kind not in TIME_SAMPLINGS:
            raise ValueError(f"Unknown time_sampling '{self.kind}'. Choose one of: {', '.join(TIME_SAMPLINGS)}.")
        if self.std <= 0:
            raise ValueError(f"time_std must be > 0 for logit-normal time sampling, got {self.std}.")

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype | None = None) -> Tensor:
        if self.kind == "uniform":
            return torch.rand(n, generator=generator, device=device, dtype=dtype)
        normal = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.mean + self.std * normal)
