"""Exact log-likelihood of any velocity model ``f(x, t)`` by integrating data back to noise.

The lecture's final CNF formula, with ``t_noise = 0`` and ``t_data = 1``::

    log p_data(x) = log p_noise(z(0)) - int_0^1 Tr(df/dz)(z(t), t) dt,   z(1) = x, dz/dt = f(z, t)

computed by solving the augmented ODE of :class:`AugmentedDynamics` from ``t_data`` to
``t_noise``. Used by the CNF (trained through it), by flow matching's ``log_prob`` and by any
other model whose sampler is an ODE (e.g. a diffusion model's probability-flow ODE, whose
``t_noise``/``t_data`` may be the other way round: only the two endpoints matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from lightning_flows.ode.cnf_dynamics import AugmentedDynamics, VelocityModel
from lightning_flows.ode.divergence import ProbeKind, sample_probe
from lightning_flows.ode.solve import ODESolution, SolverConfig, integrate
from lightning_flows.performance import full_precision


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per example: ``z: (B, *shape)`` -> ``(B,)``."""
    flat = z.flatten(1)
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


@dataclass
class ODELikelihood:
    """The outcome of one likelihood solve; every per-example tensor is ``(B,)``.

    ``log_prob``: log p_data(x) in nats. ``noise``: ``z(t_noise)``, ``(B, *shape)``.
    ``trace_integral``: ``int_{t_noise}^{t_data} Tr(df/dz) dt`` (the log-volume change).
    ``kinetic_energy`` / ``jacobian_frobenius``: ``int ||f||^2 dt`` / ``int ||df/dz||_F^2 dt`` over
    the same interval when requested (RNODE), else None.
    """

    log_prob: Tensor
    noise: Tensor
    trace_integral: Tensor
    kinetic_energy: Tensor | None
    jacobian_frobenius: Tensor | None
    solution: ODESolution

    @property
    def nfe(self) -> int:
        return self.solution.nfe


def ode_log_likelihood(velocity: VelocityModel, x: Tensor, solver: SolverConfig, *, divergence: str = "exact",
                       probe: ProbeKind = "rademacher", kinetic_energy: bool = False,
                       jacobian_frobenius: bool = False, t_noise: float = 0.0, t_data: float = 1.0,
                       base_log_prob: Callable[[Tensor], Tensor] = standard_normal_log_prob,
                       chunk_size: int | None = None, generator: torch.Generator | None = None) -> ODELikelihood:
    """``log p(x)`` of the flow ``dx/dt = velocity(x, t)`` that carries ``base`` at ``t_noise`` to data.

    Args:
        velocity: ``f(x, t)``, ``(B, *shape)`` -> same shape; an ``nn.Module`` when ``solver.adjoint``.
        x: ``(B, *shape)`` data in model space.
        solver: how to integrate (method, steps or tolerances, ``max_nfe`` cap, adjoint).
        divergence: ``exact`` or ``hutchinson`` (one ``probe`` per example drawn here, fixed for the solve).
        kinetic_energy, jacobian_frobenius: also integrate the RNODE regularisers.
        base_log_prob: log-density of the noise end, ``(B, *shape)`` -> ``(B,)``.
        chunk_size: bounds the memory of the exact trace (see :func:`exact_divergence`).

    Gradients flow to ``velocity``'s parameters when grad is enabled; under ``torch.no_grad`` (or
    inference mode) nothing is stored, so evaluation memory does not grow with the NFE. The solve runs in
    float32 even inside a bf16/fp16 autocast region (:func:`lightning_flows.performance.full_precision`):
    a log-likelihood must not depend on the training precision.

    Called under ``torch.inference_mode`` (Lightning's validation and test loops), the solve leaves it:
    the trace ``Tr(df/dz)`` is computed by ``torch.func`` transforms, which need autograd, and inference
    mode turns autograd off (older torch versions silently returned zero derivatives there: a wrong
    likelihood). Gradients stay off, so nothing is stored; the result is an ordinary tensor.
    """
    if torch.is_inference_mode_enabled():
        # clone(): an inference tensor cannot take part in autograd, even outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            return ode_log_likelihood(velocity, x.clone(), solver, divergence=divergence, probe=probe,
                                      kinetic_energy=kinetic_energy, jacobian_frobenius=jacobian_frobenius,
                                      t_noise=t_noise, t_data=t_data, base_log_prob=base_log_prob,
                                      chunk_size=chunk_size, generator=generator)
    with full_precision(x.device.type):
        return _ode_log_likelihood(velocity, x, solver, divergence, probe, kinetic_energy, jacobian_frobenius,
                                   t_noise, t_data, base_log_prob, chunk_size, generator)


def _ode_log_likelihood(velocity, x, solver, divergence, probe, kinetic_energy, jacobian_frobenius, t_noise,
                        t_data, base_log_prob, chunk_size, generator) -> ODELikelihood:
    if solver.adjoint and not isinstance(velocity, nn.Module):
        raise TypeError("solver.adjoint needs the velocity model to be an nn.Module so that its parameters "
                        "can receive adjoint gradients; pass the module or set adjoint: false.")
    dynamics = AugmentedDynamics(velocity, divergence, kinetic_energy, jacobian_frobenius, chunk_size)
    if divergence == "hutchinson":
        dynamics.probe = sample_probe(x, probe, generator)
    zeros = x.new_zeros(x.shape[0])
    state0 = (x, zeros) + (zeros,) * (int(kinetic_energy) + int(jacobian_frobenius))
    solution = integrate(dynamics, state0, solver, t0=t_data, t1=t_noise)
    noise, log_density_change, *accumulated = solution.states
    # The accumulators integrated from t_data to t_noise; report them over noise -> data.
    direction = 1.0 if t_data >= t_noise else -1.0
    kinetic = -direction * accumulated.pop(0) if kinetic_energy else None
    frobenius = -direction * accumulated.pop(0) if jacobian_frobenius else None
    # L(t) = log p_t(z(t)) - log p_data(x) with L(t_data) = 0, so L(t_noise) = log p_noise(z) - log p_data(x).
    log_prob = base_log_prob(noise) - log_density_change
    return ODELikelihood(log_prob=log_prob, noise=noise, trace_integral=log_density_change,
                         kinetic_energy=kinetic, jacobian_frobenius=frobenius, solution=solution)
