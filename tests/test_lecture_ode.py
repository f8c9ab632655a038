"""The lecture's ODE worked example, through the project's ODE layer."""

import math

import pytest
import torch

from lightning_flows.ode import ODEStepLimitExceeded, SolverConfig, integrate


def decay(y, t):
    return -2 * y


def test_euler_steps_match_the_lecture():
    # dy/dt = -2y, y(0) = 3, dt = 0.1: y1 = 3 - 0.6 = 2.4, y2 = 2.4 - 0.48 = 1.92.
    times = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    solution = integrate(decay, torch.tensor([3.0], dtype=torch.float64), SolverConfig("euler", steps=2), times=times)
    assert solution.states[1].item() == pytest.approx(2.4, abs=1e-12)
    assert solution.states[2].item() == pytest.approx(1.92, abs=1e-12)
    assert solution.nfe == 2


def test_adaptive_solver_matches_the_analytic_solution():
    # y(t) = 3 exp(-2t); at t = 0.5, y = 3/e ~ 1.10.
    solution = integrate(decay, torch.tensor([3.0], dtype=torch.float64), SolverConfig("dopri5", rtol=1e-8, atol=1e-8),
                         0.0, 0.5)
    assert solution.states.item() == pytest.approx(3 * math.exp(-1), rel=1e-6)


def test_nfe_cap_raises_a_clear_error():
    with pytest.raises(ODEStepLimitExceeded, match="max_nfe=5"):
        integrate(decay, torch.tensor([3.0]), SolverConfig("euler", steps=10, max_nfe=5))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="Unknown ODE method 'eulr'"):
        SolverConfig("eulr")
