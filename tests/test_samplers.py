"""Fixed-step samplers of lightning_flows.ode: EDM's Heun, time grids, NFE counting, config compatibility."""

import math

import pytest
import torch

from lightning_flows.models import FlowMatching
from lightning_flows.ode import ODEStepLimitExceeded, SolverConfig, integrate, ode_log_likelihood, time_grid

RATE = -1.3  # dy/dt = RATE * y, y(t) = y0 exp(RATE t)


def _linear(y, t):
    return RATE * y


def _error(config: SolverConfig) -> float:
    y1 = integrate(_linear, torch.tensor([1.0], dtype=torch.float64), config).states
    return abs(y1.item() - math.exp(RATE))


@pytest.mark.parametrize("grid", ["uniform", "power"])
def test_heun_converges_at_second_order_on_a_linear_ode(grid):
    errors = [_error(SolverConfig("heun", steps=n, time_grid=grid)) for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.6 < coarse / fine < 4.4, errors  # halving h quarters the error
    assert errors[-1] < 1e-3
    # Euler for contrast: first order.
    assert 1.8 < _error(SolverConfig("euler", steps=32)) / _error(SolverConfig("euler", steps=64)) < 2.2


def test_heun_is_edm_heun_with_a_final_euler_step():
    # One step: plain Euler. Two steps: one trapezoidal step, then Euler.
    h = 0.5
    assert math.isclose(integrate(_linear, torch.tensor([1.0], dtype=torch.float64),
                                  SolverConfig("heun", steps=1)).states.item(), 1 + RATE)
    trapezoid = 1 + h * RATE + (h * RATE) ** 2 / 2
    two = integrate(_linear, torch.tensor([1.0], dtype=torch.float64), SolverConfig("heun", steps=2)).states.item()
    assert math.isclose(two, trapezoid * (1 + h * RATE))


@pytest.mark.parametrize("method,steps,nfe", [("euler", 6, 6), ("midpoint", 6, 12), ("rk4", 6, 24), ("heun", 6, 11),
                                              ("heun", 1, 1)])
@pytest.mark.parametrize("grid", ["uniform", "power"])
def test_nfe_is_counted_per_method(method, steps, nfe, grid):
    calls = []

    def field(y, t):
        calls.append(t)
        return -y

    solution = integrate(field, torch.ones(3), SolverConfig(method, steps=steps, time_grid=grid))
    assert solution.nfe == len(calls) == nfe


def test_adaptive_nfe_matches_the_evaluations_made():
    calls = []

    def field(y, t):
        calls.append(t)
        return torch.cos(3 * t) * y

    solution = integrate(field, torch.ones(2, dtype=torch.float64), SolverConfig("dopri5", rtol=1e-7, atol=1e-7))
    assert solution.nfe == len(calls) > 6


def test_heun_respects_the_nfe_cap():
    with pytest.raises(ODEStepLimitExceeded, match="max_nfe=5"):
        integrate(_linear, torch.ones(1), SolverConfig("heun", steps=4, max_nfe=5))


def test_power_grid_is_denser_towards_the_end_of_the_solve():
    config = SolverConfig("euler", steps=5, time_grid="power", rho=3.0)
    grid = time_grid(config, 0.0, 1.0)
    steps = grid.diff()
    assert grid[0] == 0 and grid[-1] == 1 and (steps > 0).all() and (steps.diff() < 0).all()
    assert torch.allclose(time_grid(SolverConfig(steps=5, time_grid="power", rho=1.0), 0.0, 1.0),
                          torch.linspace(0, 1, 6))
    backwards = time_grid(config, 1.0, 0.0)
    assert backwards[-1] == 0 and (backwards.diff().abs().diff() < 0).all()


def test_torchdiffeq_methods_step_on_the_power_grid():
    # Euler on dy/dt = y multiplies by (1 + h_i) on each step of the grid.
    config = SolverConfig("euler", steps=4, time_grid="power", rho=2.5)
    expected = torch.prod(1 + time_grid(config, 0.0, 1.0).double().diff())
    y1 = integrate(lambda y, t: y, torch.ones(1, dtype=torch.float64), config).states
    assert torch.isclose(y1, expected).all()
    # And backwards in time (data -> noise), the grid runs from t0 = 1 to t1 = 0.
    back = integrate(lambda y, t: y, torch.ones(1, dtype=torch.float64), config, t0=1.0, t1=0.0).states
    assert torch.isclose(back, torch.prod(1 + time_grid(config, 1.0, 0.0).double().diff())).all()


def test_heun_integrates_augmented_states_for_the_likelihood():
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def field(x, t):
        return net(torch.cat([x, t.expand(x.shape[0], 1)], 1))

    x = torch.randn(5, 2)
    with torch.no_grad():
        heun = ode_log_likelihood(field, x, SolverConfig("heun", steps=40)).log_prob
        reference = ode_log_likelihood(field, x, SolverConfig("dopri5", rtol=1e-7, atol=1e-7)).log_prob
    assert torch.allclose(heun, reference, atol=1e-3)


def test_invalid_sampler_settings_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown time_grid 'log'"):
        SolverConfig("euler", time_grid="log")
    with pytest.raises(ValueError, match="adaptive method 'dopri5' chooses its own"):
        SolverConfig("dopri5", time_grid="power")
    with pytest.raises(ValueError, match="no adjoint"):
        SolverConfig("heun", adjoint=True)
    with pytest.raises(ValueError, match="rho"):
        SolverConfig("euler", time_grid="power", rho=0.0)
    with pytest.raises(ValueError, match="final state only"):
        integrate(_linear, torch.ones(1), SolverConfig("heun"), times=torch.linspace(0, 1, 3))


def test_a_solver_config_pickled_before_the_new_fields_still_loads(tmp_path):
    old = SolverConfig("midpoint", steps=7)
    del old.__dict__["time_grid"], old.__dict__["rho"]  # what a checkpoint of the previous version holds
    torch.save({"sampler": old}, tmp_path / "old.pt")
    with torch.serialization.safe_globals([SolverConfig]):
        loaded = torch.load(tmp_path / "old.pt", weights_only=True)["sampler"]
    assert (loaded.method, loaded.steps, loaded.time_grid) == ("midpoint", 7, "uniform")
    assert integrate(_linear, torch.ones(1), loaded).nfe == 14


def test_flow_matching_reports_the_nfe_of_heun_sampling():
    model = FlowMatching(data_shape=(2,), hidden=8, depth=1)
    samples = model.sample(4, solver=SolverConfig("heun", steps=3, time_grid="power"))
    assert samples.shape == (4, 2) and model.last_sample_nfe == 5
