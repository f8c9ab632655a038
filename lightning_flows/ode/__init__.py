"""ODE machinery shared by CNFs, flow matching and the diffusion probability-flow ODE."""

from lightning_flows.ode.cnf_dynamics import AugmentedDynamics
from lightning_flows.ode.divergence import (
    DIVERGENCE_KINDS, PROBE_KINDS, brute_force_divergence, exact_divergence, hutchinson_divergence, local_colouring,
    sample_probe,
)
from lightning_flows.ode.likelihood import ODELikelihood, ode_log_likelihood, standard_normal_log_prob
from lightning_flows.ode.solve import (
    ADAPTIVE_METHODS, FIXED_STEP_METHODS, TIME_GRIDS, CountedField, ODESolution, ODEStepLimitExceeded, SolverConfig,
    as_solver_config, heun_edm, integrate, time_grid,
)

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "TIME_GRIDS", "CountedField", "ODESolution",
           "ODEStepLimitExceeded", "SolverConfig", "as_solver_config", "heun_edm", "integrate", "time_grid",
           "AugmentedDynamics", "DIVERGENCE_KINDS", "PROBE_KINDS", "brute_force_divergence", "exact_divergence",
           "hutchinson_divergence", "local_colouring", "sample_probe", "ODELikelihood", "ode_log_likelihood",
           "standard_normal_log_prob"]
