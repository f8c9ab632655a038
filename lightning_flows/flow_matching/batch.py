"""Everything random in one flow-matching training step, drawn together from one generator.

``draw(x1, generator)`` turns a data batch into a :class:`FlowMatchingBatch`: the coupled noise,
the times and (for ``sigma > 0``) the path noise. The training step then only evaluates the network,
so the same draw can run inside the step (:meth:`FlowMatching.training_loss`) or ahead of it in a
background thread (:class:`lightning_flows.flow_matching.pipeline.BackgroundBatches`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from lightning_flows.flow_matching.time_sampling import TimeSampler

Coupling = Callable[[Tensor, "torch.Generator | None"], "tuple[Tensor, Tensor]"]


class FlowMatchingBatch(NamedTuple):
    """``x0, x1: (B, *shape)`` coupled noise and data; ``t: (B,)``; ``path_noise``: ``eps`` or None (sigma = 0)."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    path_noise: Tensor | None


class TrainingBatchDraw:
    """``(x1, generator) -> FlowMatchingBatch``: pair by ``coupling``, then draw ``t`` and the path noise.

    Draw order (fixed, so that a seed reproduces a batch): the coupling's noise, ``t``, ``eps``.
    """

    def __init__(self, coupling: Coupling, time_sampler: TimeSampler, sigma: float = 0.0):
        if sigma < 0:
            raise ValueError(f"sigma (the Gaussian path's width) must be >= 0, got {sigma}.")
        self.coupling, self.time_sampler, self.sigma = coupling, time_sampler, sigma

    def __call__(self, x1: Tensor, generator: torch.Generator | None = None) -> FlowMatchingBatch:
        x0, x1 = self.coupling(x1, generator)
        t = self.time_sampler(x1.shape[0], generator, x1.device, x1.dtype)
        eps = None
        if self.sigma > 0:
            eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        return FlowMatchingBatch(x0, x1, t, eps)
