"""ODE machinery shared by CNFs, flow matching and the diffusion probability-flow ODE."""

from lightning_flows.ode.solve import (
    ADAPTIVE_METHODS, FIXED_STEP_METHODS, CountedField, ODESolution, ODEStepLimitExceeded, SolverConfig, as_solver_config,
    integrate,
)

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "CountedField", "ODESolution", "ODEStepLimitExceeded",
           "SolverConfig", "as_solver_config", "integrate"]
