"""MeanFlow's pieces (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the time pairs, the
MeanFlow-identity target and the adaptive loss weighting. The model is :class:`lightning_flows.models.MeanFlow`.

Time convention. This project's flow runs from noise at ``t = 0`` to data at ``t = 1``:
``z_t = (1 - t) x0 + t x1`` with velocity ``v = x1 - x0`` (:mod:`lightning_flows.flow_matching.paths`). The
*average velocity* from time ``a`` to time ``b`` along the ODE ``dz/dt = v(z, t)`` is

    u(z_a, a, b) = 1 / (b - a) * int_a^b v(z_t, t) dt,      so that   z_b = z_a + (b - a) u(z_a, a, b),

and ``u(z, t, t) = v(z, t)``. One step from noise is ``x = z_0 + u(z_0, 0, 1)``. The paper runs time the other
way (data at 0, noise at 1; ``z_r = z_t - (t - r) u(z_t, r, t)``, its ``z_0 = z_1 - u(z_1, 0, 1)``): with
``t_paper = 1 - a`` and ``r_paper = 1 - b`` its ``u`` is minus ours and its velocity ``eps - x`` minus ours.

The MeanFlow identity. Differentiating ``(b - a) u(z_a, a, b) = int_a^b v dt`` in the start time ``a``, with
``z_a`` moving along the flow, gives

    u(z_a, a, b) = v(z_a, a) + (b - a) * d/da u(z_a, a, b),    d/da u = (dz u) v + da u,

the total derivative being the Jacobian-vector product of ``u`` along the tangent ``(v, 1, 0)`` in
``(z, a, b)`` (the paper's ``(v, 0, 1)`` in its ``(z, r, t)``: the same derivative in its reversed time). Training
regresses ``u_theta(z_a, a, b)`` on ``sg(v + (b - a) jvp)`` with the conditional velocity ``x1 - x0`` for ``v``
(:func:`mean_flow_target`, ``torch.func.jvp``: one forward pass carrying the tangent). With ``a = b`` the target
is ``v`` itself: flow matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lightning_flows.flow_matching.time_sampling import TimeSampler

AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class MeanFlowTimes:
    """How training draws the interval ``(a, b)``, ``0 <= a <= b <= 1`` (``a``: where ``z`` lives, ``b``: the end).

    Two times are drawn from ``distribution`` (``logit_normal`` with ``mean``/``std``, or ``uniform``); ``a`` is the
    smaller, ``b`` the larger; then a share ``equal_share`` of the pairs is set to ``b = a`` (the instantaneous
    velocity, flow matching's target). The defaults are the paper's best (logit-normal (-0.4, 1.0) in its time,
    i.e. mean +0.4 in ours; 75% of the pairs with ``r = t``).
    """

    distribution: str = "logit_normal"
    mean: float = 0.4
    std: float = 1.0
    equal_share: float = 0.75

    def __post_init__(self):
        TimeSampler(self.distribution, self.mean, self.std)  # validates both
        if not 0.0 <= self.equal_share <= 1.0:
            raise ValueError(f"equal_share (the share of pairs with b = a) must lie in [0, 1], got {self.equal_share}.")

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(a, b)``, each ``(n,)``. Draw order (a seed reproduces a batch): both times, then the equal mask."""
        sampler = TimeSampler(self.distribution, self.mean, self.std)
        first, second = sampler(n, generator, device, dtype), sampler(n, generator, device, dtype)
        a, b = torch.minimum(first, second), torch.maximum(first, second)
        draw_on = device if generator is None else "cpu"  # a generator draws on its own device
        equal = (torch.rand(n, generator=generator, device=draw_on) < self.equal_share).to(a.device)
        return a, torch.where(equal, a, b)


@dataclass
class AdaptiveWeighting:
    """The paper's adaptive loss weight: per example, ``w = 1 / (||delta||^2 + eps)^power`` (stop-gradient) on the
    squared error ``||delta||^2`` (summed over the example's dimensions). ``power = 0`` is the plain squared error
    (flow matching's loss), ``0.5`` a pseudo-Huber loss, ``1`` (the paper's choice) close to a relative error."""

    power: float = 1.0
    eps: float = 1e-3

    def __post_init__(self):
        if self.power < 0 or self.eps <= 0:
            raise ValueError(f"the adaptive weighting needs power >= 0 and eps > 0, got power={self.power}, "
                             f"eps={self.eps}.")


def broadcast_to(t: Tensor, like: Tensor) -> Tensor:
    """``t: (B,)`` as ``(B, 1, ..., 1)`` against ``like: (B, *shape)``."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def mean_flow_target(average_velocity: AverageVelocity, z: Tensor, a: Tensor, b: Tensor,
                     velocity: Tensor, tangent: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The prediction ``u_theta(z, a, b)`` (differentiable in the weights) and its MeanFlow target
    ``sg(v + (b - a) (d/da) u_theta)`` from one ``torch.func.jvp`` along ``(dz/da, 1, 0)``.

    ``average_velocity(z, a, b)``: ``z: (B, *shape)``, ``a, b: (B,)`` -> ``(B, *shape)``; ``velocity``: the
    instantaneous velocity ``v`` at ``(z, a)`` of the target, ``(B, *shape)``; ``tangent``: ``dz/da`` of the total
    derivative, ``(B, *shape)``, by default ``velocity`` (the paper). ``d/da u`` is linear in the tangent, so any
    tangent whose mean given ``z`` is the marginal velocity (the path's ``x1 - x0``, or a model of that mean such
    as the network's own ``u_theta(z, a, a)``) aims at the same average velocity; the model's has no per-example
    noise.
    """
    tangent = velocity if tangent is None else tangent
    u, du_da = torch.func.jvp(average_velocity, (z, a, b), (tangent, torch.ones_like(a), torch.zeros_like(b)))
    target = velocity + broadcast_to(b - a, z) * du_da
    return u, target.detach()


def adaptive_loss(prediction: Tensor, target: Tensor, weighting: AdaptiveWeighting) -> Tensor:
    """``mean_B(sg(w) ||prediction - target||^2) / D`` for ``(B, *shape)`` tensors (``D``: an example's size): with
    ``power = 0`` exactly the mean squared error over all elements."""
    error = (prediction - target).pow(2).flatten(1).sum(1)
    weight = (error.detach() + weighting.eps).pow(-weighting.power) if weighting.power > 0 else 1.0
    return (weight * error).mean() / prediction[0].numel()


__all__ = ["AdaptiveWeighting", "MeanFlowTimes", "adaptive_loss", "broadcast_to", "mean_flow_target"]
