"""A thin, bounded layer over torchdiffeq shared by every ODE-based family.

Velocity models follow the convention ``f(x, t)``; torchdiffeq wants ``func(t, y)``. The wrapper
below adapts the signature, counts function evaluations (NFE) and enforces a hard cap on them, so
a stiff or diverging solve fails with a clear error instead of growing memory without bound.

The cap covers a whole solve: the forward pass *and*, with ``adjoint=True``, the evaluations of the
backward (adjoint) pass, because the adjoint solve is another ODE solve that can blow up too.
Backprop through the solver (``adjoint=False``) stores every step's graph, so there the cap is
also what bounds memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Callable

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "heun", "explicit_adams", "implicit_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# Fixed-step methods written here rather than taken from torchdiffeq.
OWN_METHODS = ("heun",)
TIME_GRIDS = ("uniform", "power")


class ODEStepLimitExceeded(RuntimeError):
    """Raised when a solve needs more function evaluations than its ``max_nfe`` cap."""


class ODEStepSizeUnderflow(RuntimeError):
    """Raised when an adaptive solver's step shrinks to nothing (torchdiffeq's "underflow in dt")."""


def _underflow_error(err: AssertionError, config: SolverConfig) -> ODEStepSizeUnderflow:
    return ODEStepSizeUnderflow(
        f"The adaptive ODE solver {config.method} (rtol={config.rtol}, atol={config.atol}) shrank its step to "
        f"nothing (torchdiffeq: {err}): the field is too stiff for these tolerances or blows up, e.g. after "
        f"training diverged. In the model's solver settings (sampler, test_solver, likelihood_solver, e.g. "
        f"--model.init_args.sampler.rtol) loosen rtol/atol, or use a fixed-step method (method: rk4 with "
        f"steps: N, where N bounds the cost); or regularise the field (kinetic_weight / jacobian_weight of a "
        f"CNF); and check the weights for NaN/inf.")


@dataclass
class SolverConfig:
    """How to integrate an ODE.

    Args:
        method: a torchdiffeq method, or ``heun``: Heun's 2nd-order method as EDM samples with it (a trapezoidal
            correction on every step but the last, which is Euler: ``2 * steps - 1`` evaluations).
            Fixed-step methods use ``steps``, adaptive ones ``rtol``/``atol``.
        steps: number of fixed steps over the whole interval.
        time_grid: where fixed steps fall: ``uniform``, or ``power``: ``t_i = t0 + (t1 - t0) (1 - (1 - i/N)^rho)``,
            steps shrinking towards ``t1``, the end of the solve (the data end of a sampler; EDM's rho spacing
            of the remaining noise level ``1 - t``).
        rho: the ``power`` grid's exponent (1 = uniform; > 1 denser near ``t1``; < 1 denser near ``t0``).
        rtol, atol: tolerances of adaptive methods.
        max_nfe: hard cap on function evaluations of one solve (including an adjoint backward pass);
            exceeding it raises :class:`ODEStepLimitExceeded`.
        adjoint: backpropagate with the adjoint method (memory flat in the number of steps).
        adjoint_seminorm: with an adaptive method, control the adjoint solve's error on the state and
            its adjoint only, not on the parameter-gradient integrals (Kidger et al. 2021); usually
            far fewer backward evaluations for the same gradients.
    """

    method: str = "euler"
    steps: int = 100
    rtol: float = 1e-5
    atol: float = 1e-5
    max_nfe: int = 10_000
    adjoint: bool = False
    adjoint_seminorm: bool = True
    # Added after checkpoints stored this class: new fields need defaults (an old pickle lacks them and falls
    # back to these class attributes).
    time_grid: str = "uniform"
    rho: float = 2.0

    def __post_init__(self):
        if self.method not in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
            raise ValueError(f"Unknown ODE method '{self.method}'. Choose one of: "
                             f"{', '.join(FIXED_STEP_METHODS + ADAPTIVE_METHODS)}.")
        if self.steps < 1 or self.max_nfe < 1:
            raise ValueError("steps and max_nfe must be >= 1")
        if self.time_grid not in TIME_GRIDS:
            raise ValueError(f"Unknown time_grid '{self.time_grid}'. Choose one of: {', '.join(TIME_GRIDS)}.")
        if self.rho <= 0:
            raise ValueError(f"rho (the power time grid's exponent) must be > 0, got {self.rho}.")
        if self.adaptive and self.time_grid != "uniform":
            raise ValueError(f"time_grid '{self.time_grid}' places fixed steps; the adaptive method '{self.method}' "
                             f"chooses its own. Use a fixed-step method (euler, midpoint, heun, rk4) or time_grid: "
                             f"uniform.")
        if self.method in OWN_METHODS and self.adjoint:
            raise ValueError(f"method '{self.method}' has no adjoint; backpropagate through it (adjoint: false) or "
                             f"use a torchdiffeq method such as rk4 or dopri5 with the adjoint.")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS


def as_solver_config(config: SolverConfig | dict | None) -> SolverConfig:
    """Accept a :class:`SolverConfig`, its dict form (as stored in checkpoints) or None (defaults)."""
    if config is None:
        return SolverConfig()
    return config if isinstance(config, SolverConfig) else SolverConfig(**config)


class CountedField(nn.Module):
    """Adapts ``f(x, t)`` to torchdiffeq's ``func(t, y)``, counting and capping evaluations.

    ``nfe`` counts the forward solve; once it has returned, :meth:`start_backward` switches the
    counting to ``nfe_backward`` (evaluations made by an adjoint backward pass). ``max_nfe`` caps
    the sum of both.
    """

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor], max_nfe: int):
        super().__init__()
        self.field = field
        self.max_nfe = max_nfe
        self.nfe = 0
        self.nfe_backward = 0
        self._in_backward = False

    def start_backward(self) -> None:
        self._in_backward = True

    def forward(self, t: Tensor, y):
        if self._in_backward:
            self.nfe_backward += 1
        else:
            self.nfe += 1
        if self.nfe + self.nfe_backward > self.max_nfe:
            stage = "adjoint backward pass" if self._in_backward else "forward solve"
            raise ODEStepLimitExceeded(
                f"ODE solve exceeded its cap of max_nfe={self.max_nfe} function evaluations during the "
                f"{stage} ({self.nfe} forward + {self.nfe_backward} backward). Raise the cap (solver "
                f"max_nfe), loosen rtol/atol, use fewer fixed steps, or regularise the field (e.g. "
                f"kinetic_weight / jacobian_weight of a CNF) so that it is less stiff."
            )
        return self.field(y, t)


def time_grid(config: SolverConfig, t0: Tensor | float, t1: Tensor | float) -> Tensor:
    """The ``config.steps + 1`` times of a fixed-step solve from ``t0`` to ``t1`` (either direction)."""
    t0, t1 = torch.as_tensor(t0), torch.as_tensor(t1)
    u = torch.linspace(0, 1, config.steps + 1, dtype=t0.dtype, device=t0.device)
    if config.time_grid == "power":
        u = 1 - (1 - u) ** config.rho
    return t0 + (t1 - t0) * u


def _axpy(y, h: Tensor, dy):
    """``y + h * dy`` for a tensor or a tuple of tensors (augmented states)."""
    if isinstance(y, tuple):
        return tuple(a + h * b for a, b in zip(y, dy))
    return y + h * dy


def heun_edm(func: Callable, y0, grid: Tensor):
    """Heun's method on ``grid`` as EDM (Karras et al. 2022, Alg. 1) samples: Euler predictor, trapezoidal
    corrector, except on the last step, which stays Euler (at a diffusion's data end the field is least
    reliable and the correction would cost an evaluation for little). ``func(t, y)``; ``2 N - 1`` evaluations.
    """
    y = y0
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t
        slope = func(t, y)
        euler = _axpy(y, h, slope)
        if i == last:
            y = euler
        else:
            slope_next = func(t_next, euler)
            y = _axpy(_axpy(y, h / 2, slope), h / 2, slope_next)
    return y


@dataclass
class ODESolution:
    """``states``: the state at each requested time, ``(len(times), *y.shape)`` (or the final state).

    ``nfe``: evaluations of the forward solve. ``nfe_backward`` (read it after ``loss.backward()``):
    evaluations of the adjoint backward pass; 0 when backpropagating through the solver, which
    re-evaluates nothing (it replays the stored graph).
    """

    states: Tensor | tuple[Tensor, ...]
    nfe: int
    counter: CountedField | None = dataclass_field(default=None, repr=False)

    @property
    def nfe_backward(self) -> int:
        return 0 if self.counter is None else self.counter.nfe_backward


def integrate(field: Callable, y0: Tensor | tuple[Tensor, ...], config: SolverConfig, t0: float = 0.0,
              t1: float = 1.0, times: Tensor | None = None,
              adjoint_params: tuple[Tensor, ...] | None = None) -> ODESolution:
    """Integrate ``dy/dt = field(y, t)`` from ``t0`` to ``t1``; return the final state and the NFE.

    ``field`` may act on a tensor or on a tuple of tensors (augmented dynamics). With
    ``times`` given, states at every time are returned instead of only the last one. ``t1 < t0``
    integrates backwards in time (data -> noise for a likelihood).
    ``adjoint_params``: the tensors that receive gradients through the adjoint pass; defaults to
    ``field.parameters()`` (the adjoint method needs them named, it cannot discover them).
    """
    ref = y0[0] if isinstance(y0, tuple) else y0
    grid = times if times is not None else torch.tensor([t0, t1])
    grid = grid.to(device=ref.device, dtype=ref.dtype)
    counted = CountedField(field, config.max_nfe)
    if config.method in OWN_METHODS:
        if times is not None:
            raise ValueError(f"method '{config.method}' returns the final state only; pass times=None or use a "
                             f"torchdiffeq method (euler, midpoint, rk4) for states at several times.")
        states = heun_edm(counted, y0, time_grid(config, grid[0], grid[-1]))
        counted.start_backward()
        return ODESolution(states=states, nfe=counted.nfe, counter=counted)
    kwargs: dict = {"method": config.method}
    if config.adaptive:
        kwargs.update(rtol=config.rtol, atol=config.atol)
    elif config.time_grid == "uniform":
        kwargs["options"] = {"step_size": abs(float(grid[-1] - grid[0])) / config.steps}
    else:
        # torchdiffeq integrates increasing times (it negates decreasing ones), so the grid's dense end stays t1.
        kwargs["options"] = {"grid_constructor": lambda func, y, t: time_grid(config, t[0], t[-1])}
    if config.adjoint:
        if adjoint_params is None:
            if not isinstance(field, nn.Module):
                raise TypeError("The adjoint method needs the field to be an nn.Module (its parameters get "
                                "gradients) or explicit adjoint_params=...; or set the solver's adjoint: false.")
            adjoint_params = tuple(p for p in field.parameters() if p.requires_grad)
        kwargs["adjoint_params"] = tuple(adjoint_params)
        if config.adaptive and config.adjoint_seminorm:
            kwargs["adjoint_options"] = {"norm": "seminorm"}
    try:
        out = (odeint_adjoint if config.adjoint else odeint)(counted, y0, grid, **kwargs)
    except AssertionError as err:
        if "underflow in dt" in str(err):
            raise _underflow_error(err, config) from err
        raise
    # Every evaluation from now on belongs to an adjoint backward pass.
    counted.start_backward()
    states = out if times is not None else (tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1])
    return ODESolution(states=states, nfe=counted.nfe, counter=counted)
