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
    """``x0, x1: (B, *shape)`` coupled noise and data; ``t: (B,)``; ``path_noise``: ``eps`` or None (sigma = 0);
    ``y: (B,)`` the class labels of ``x1`` (a labelled batch), else None."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    path_noise: Tensor | None
    y: Tensor | None = None


class TrainingBatchDraw:
    """``(x1, generator) -> FlowMatchingBatch``: pair by ``coupling``, then draw ``t`` and the path noise.

    ``x1`` is a data batch ``(B, *shape)`` or a labelled one ``(x1, y)``. The couplings pair by re-ordering
    the *noise* (OT permutes ``x0``; ``x1`` keeps its order), so each label stays with its own ``x1``.
    Draw order (fixed, so that a seed reproduces a batch): the coupling's noise, ``t``, ``eps``.
    """

    def __init__(self, coupling: Coupling, time_sampler: TimeSampler, sigma: float = 0.0):
        if sigma < 0:
            raise ValueError(f"sigma (the Gaussian path's width) must be >= 0, got {sigma}.")
        self.coupling, self.time_sampler, self.sigma = coupling, time_sampler, sigma

    def __call__(self, x1: Tensor | tuple[Tensor, Tensor],
                 generator: torch.Generator | None = None) -> FlowMatchingBatch:
        x1, y = x1 if isinstance(x1, (tuple, list)) else (x1, None)
        data = x1
        x0, x1 = self.coupling(x1, generator)
        if y is not None and x1 is not data:
            raise ValueError("this coupling replaces the data batch (reflow's teacher pairs), so the labels would "
                             "no longer describe x1; class-conditional flow matching supports the independent "
                             "and ot couplings.")
        t = self.time_sampler(x1.shape[0], generator, x1.device, x1.dtype)
        eps = None
        if self.sigma > 0:
            eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        return FlowMatchingBatch(x0, x1, t, eps, y)
