"""The exact ODE likelihood's options, grouped: which solver, which divergence, how the trace is chunked.

A velocity model ``f(x, t)`` defines a CNF, whose exact ``log p(x)`` :func:`lightning_flows.ode.ode_log_likelihood`
computes by integrating the data back to noise with the trace term. :class:`ODELikelihoodOptions` is what a
family needs to call it (MeanFlow through its instantaneous velocity).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_flows.ode import SolverConfig, as_solver_config

DIVERGENCES = ("auto", "exact", "hutchinson")


@dataclass
class ODELikelihoodOptions:
    """Args:
        solver: the likelihood's ODE solver (:class:`SolverConfig` or its dict; default dopri5 at
            rtol = atol = 1e-5, capped at ``max_nfe``).
        divergence: ``exact`` trace (``D`` backward passes per evaluation), ``hutchinson`` (one; an unbiased
            estimate of the same log-likelihood) or ``auto``: exact up to ``exact_max_dim`` dimensions.
        exact_max_dim: ``auto``'s threshold (exact for toy 2D and 8x8 digits; see FlowMatching's measurement).
        trace_chunk_size: Jacobian rows the exact trace computes at once (None: all).
    """

    solver: SolverConfig | dict | None = None
    divergence: str = "auto"
    exact_max_dim: int = 64
    trace_chunk_size: int | None = 64

    def __post_init__(self):
        self.solver = as_solver_config(self.solver or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5})
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"the likelihood's divergence must be one of {', '.join(DIVERGENCES)}, got "
                             f"'{self.divergence}'.")
        if self.trace_chunk_size is not None and self.trace_chunk_size < 1:
            raise ValueError(f"trace_chunk_size must be >= 1 (or null: all rows at once), got {self.trace_chunk_size}.")

    def divergence_for(self, dim: int) -> str:
        """``exact`` or ``hutchinson`` for examples of ``dim`` dimensions (``auto`` resolved)."""
        if self.divergence != "auto":
            return self.divergence
        return "exact" if dim <= self.exact_max_dim else "hutchinson"


__all__ = ["DIVERGENCES", "ODELikelihoodOptions"]
