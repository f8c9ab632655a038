"""Flow matching exactly as the lecture defines it.

Training: ``x0 ~ N(0, I)`` drawn independently of ``x1 ~ data``, ``t ~ U[0, 1]``,
``x_t = (1 - t) x0 + t x1``, and the network ``f_theta(x_t, t)`` regresses the path velocity
``x1 - x0`` (the minimiser is ``E[x1 - x0 | x_t = x]``, the marginal field).
Sampling: solve ``dx/dt = f_theta(x, t)`` from ``t = 0`` (noise) to ``t = 1`` (data).
Likelihood: the learned field is a CNF, so ``log_prob`` is exact through the shared
:func:`lightning_flows.ode.ode_log_likelihood` (data integrated back to noise with the trace term).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lightning_flows.models.base import GenerativeModel
from lightning_flows.nn import make_time_backbone
from lightning_flows.ode import SolverConfig, as_solver_config, integrate, ode_log_likelihood


def linear_path(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The lecture's straight path: ``x_t = (1 - t) x0 + t x1`` and its velocity ``x1 - x0``.

    ``x0, x1: (B, *shape)``, ``t: (B,)``.
    """
    t_ = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t_) * x0 + t_ * x1, x1 - x0


class FlowMatching(GenerativeModel):
    """Conditional flow matching with independent coupling and the linear path.

    Args:
        backbone: ``auto`` (UNet for images, MLP for vectors), ``mlp`` or ``unet``.
        hidden, depth, activation: MLP width, number of hidden layers and activation.
        base_channels, channel_mults: UNet widths.
        sampler: ODE solver used by ``sample`` (method, steps or tolerances, NFE cap).
        likelihood_solver: ODE solver of the exact ``log_prob`` (default dopri5, rtol = atol = 1e-5).
        likelihood_divergence: ``exact`` trace (D backward passes per evaluation) or ``hutchinson`` (one;
            an unbiased estimate of the same log-likelihood, the affordable choice for images on a CPU).
    """

    likelihood = "exact"

    def __init__(self, data_shape: Sequence[int] = (2,), backbone: str = "auto", hidden: int = 256,
                 depth: int = 3, activation: str = "silu", base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), sampler: SolverConfig | dict | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_steps: int = 0,
                 likelihood_solver: SolverConfig | dict | None = None, likelihood_divergence: str = "exact"):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.sampler = as_solver_config(sampler)
        self.likelihood_solver = as_solver_config(
            likelihood_solver or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5})
        if likelihood_divergence not in ("exact", "hutchinson"):
            raise ValueError(f"likelihood_divergence must be 'exact' or 'hutchinson', got '{likelihood_divergence}'.")
        self.likelihood_divergence = likelihood_divergence
        self.last_log_prob_nfe: int | None = None
        self.velocity = make_time_backbone(self.data_shape, backbone, hidden=hidden, depth=depth,
                                           base_channels=base_channels, channel_mults=channel_mults,
                                           activation=activation)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The learned field ``f_theta(x, t)``: ``(B, *data_shape)`` -> same shape."""
        return self.velocity(x, t)

    def training_loss(self, x1: Tensor) -> Tensor:
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
        xt, target = linear_path(x0, x1, t)
        return (self.velocity(xt, t) - target).pow(2).mean()

    @torch.no_grad()
    def sample(self, n: int, solver: SolverConfig | None = None) -> Tensor:
        x0 = torch.randn(n, *self.data_shape, device=self.device)
        solution = integrate(self.velocity, x0, solver or self.sampler, 0.0, 1.0)
        self.last_sample_nfe = solution.nfe
        return solution.states

    def log_prob(self, x: Tensor, solver: SolverConfig | None = None) -> Tensor:
        """``log p(x)`` in nats of the model's ODE, ``(B, *data_shape)`` -> ``(B,)``.

        Exact trace, or Hutchinson's unbiased estimate of it (``likelihood_divergence``).
        """
        result = ode_log_likelihood(self.velocity, x, solver or self.likelihood_solver,
                                    divergence=self.likelihood_divergence)
        self.last_log_prob_nfe = result.nfe
        return result.log_prob
