"""A thin, bounded layer over torchdiffeq shared by every ODE-based family.

Velocity models follow the convention ``f(x, t)``; torchdiffeq wants ``func(t, y)``. The wrapper
below adapts the signature, counts function evaluations (NFE) and enforces a hard cap on them, so
a stiff or diverging solve fails with a clear error instead of growing memory without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class ODEStepLimitExceeded(RuntimeError):
    """Raised when a solve needs more function evaluations than its ``max_nfe`` cap."""


@dataclass
class SolverConfig:
    """How to integrate an ODE.

    Args:
        method: any torchdiffeq method; fixed-step ones use ``steps``, adaptive ones ``rtol``/``atol``.
        steps: number of fixed steps over the whole interval.
        rtol, atol: tolerances of adaptive methods.
        max_nfe: hard cap on function evaluations of one solve (including an adjoint backward pass);
            exceeding it raises :class:`ODEStepLimitExceeded`.
        adjoint: backpropagate with the adjoint method (memory flat in the number of steps).
    """

    method: str = "euler"
    steps: int = 100
    rtol: float = 1e-5
    atol: float = 1e-5
    max_nfe: int = 10_000
    adjoint: bool = False

    def __post_init__(self):
        if self.method not in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
            raise ValueError(f"Unknown ODE method '{self.method}'. Choose one of: "
                             f"{', '.join(FIXED_STEP_METHODS + ADAPTIVE_METHODS)}.")
        if self.steps < 1 or self.max_nfe < 1:
            raise ValueError("steps and max_nfe must be >= 1")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS


def as_solver_config(config: SolverConfig | dict | None) -> SolverConfig:
    """Accept a :class:`SolverConfig`, its dict form (as stored in checkpoints) or None (defaults)."""
    if config is None:
        return SolverConfig()
    return config if isinstance(config, SolverConfig) else SolverConfig(**config)


class CountedField(nn.Module):
    """Adapts ``f(x, t)`` to torchdiffeq's ``func(t, y)``, counting and capping evaluations."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor], max_nfe: int):
        super().__init__()
        self.field = field
        self.max_nfe = max_nfe
        self.nfe = 0

    def forward(self, t: Tensor, y):
        self.nfe += 1
        if self.nfe > self.max_nfe:
            raise ODEStepLimitExceeded(
                f"ODE solve exceeded its cap of max_nfe={self.max_nfe} function evaluations. "
                f"Raise the cap (solver max_nfe), loosen rtol/atol, use fewer fixed steps, or regularise "
                f"the field (e.g. kinetic energy) so that it is less stiff."
            )
        return self.field(y, t)


@dataclass
class ODESolution:
    """``states``: the state at each requested time, ``(len(times), *y.shape)`` (or the final state)."""

    states: Tensor | tuple[Tensor, ...]
    nfe: int


def integrate(field: Callable, y0: Tensor | tuple[Tensor, ...], config: SolverConfig, t0: float = 0.0,
              t1: float = 1.0, times: Tensor | None = None) -> ODESolution:
    """Integrate ``dy/dt = field(y, t)`` from ``t0`` to ``t1``; return the final state and the NFE.

    ``field`` may act on a tensor or on a tuple of tensors (augmented dynamics). With
    ``times`` given, states at every time are returned instead of only the last one.
    """
    ref = y0[0] if isinstance(y0, tuple) else y0
    grid = times if times is not None else torch.tensor([t0, t1])
    grid = grid.to(device=ref.device, dtype=ref.dtype)
    counted = CountedField(field, config.max_nfe)
    kwargs: dict = {"method": config.method}
    if config.adaptive:
        kwargs.update(rtol=config.rtol, atol=config.atol)
    else:
        kwargs["options"] = {"step_size": abs(float(grid[-1] - grid[0])) / config.steps}
    if config.adjoint:
        if not isinstance(field, nn.Module):
            raise TypeError("The adjoint method needs the field to be an nn.Module (its parameters get gradients).")
        kwargs["adjoint_params"] = tuple(field.parameters())
        out = odeint_adjoint(counted, y0, grid, **kwargs)
    else:
        out = odeint(counted, y0, grid, **kwargs)
    states = out if times is not None else (tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1])
    return ODESolution(states=states, nfe=counted.nfe)
