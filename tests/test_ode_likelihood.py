"""The shared ODE likelihood path: lecture closed forms, adjoint vs direct gradients, the NFE cap."""

import math
import time

import pytest
import torch

from lightning_flows.nn.ode_functions import ConcatSquashMLP
from lightning_flows.ode import ODEStepLimitExceeded, SolverConfig, integrate, ode_log_likelihood

DOPRI5_TIGHT = SolverConfig(method="dopri5", rtol=1e-8, atol=1e-8)


class DiagonalLinearField(torch.nn.Module):
    """The lecture's f(z) = diag(a1, a2) z."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.as_tensor(a, dtype=torch.float64))

    def forward(self, z, t):
        return z * self.a


def lecture_log_density(a, x):
    a = torch.as_tensor(a, dtype=torch.float64)
    return -0.5 * (torch.exp(-2 * a) * x**2).sum(1) - math.log(2 * math.pi) - a.sum()


@pytest.mark.parametrize("a", [(0.5, -0.3), (1.2, 0.0), (-0.8, -1.1), (0.05, 2.0)])
def test_linear_cnf_matches_lecture_closed_form(a):
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-1.5, 3.0], [0.0, 0.0]], dtype=torch.float64)
    result = ode_log_likelihood(DiagonalLinearField(a), x, DOPRI5_TIGHT)
    assert torch.allclose(result.log_prob, lecture_log_density(a, x), atol=1e-4, rtol=0)
    # z(0) = e^{-a} x: the solve really went back to the noise end.
    assert torch.allclose(result.noise, x * torch.exp(-torch.tensor(a, dtype=torch.float64)), atol=1e-6)


def test_rnode_accumulators_match_closed_forms():
    a = torch.tensor([0.7, -0.4], dtype=torch.float64)
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    result = ode_log_likelihood(DiagonalLinearField(a), x, DOPRI5_TIGHT, kinetic_energy=True,
                                jacobian_frobenius=True)
    # z(t) = e^{a (t - 1)} x, so int_0^1 ||A z||^2 dt = sum_i a_i^2 x_i^2 (1 - e^{-2 a_i}) / (2 a_i).
    kinetic = (a**2 * x**2 * (1 - torch.exp(-2 * a)) / (2 * a)).sum(1)
    assert torch.allclose(result.kinetic_energy, kinetic, atol=1e-6)
    assert torch.allclose(result.jacobian_frobenius, (a**2).sum().expand(2), atol=1e-6)
    assert torch.allclose(result.trace_integral, a.sum().expand(2), atol=1e-6)


def test_hutchinson_probe_is_held_fixed_within_a_solve():
    # For a constant Jacobian A and a probe fixed during the solve, the integrated estimate is
    # exactly v^T A v for that one v; a probe redrawn per evaluation would average several.
    a = torch.tensor([[0.3, 1.0], [-0.5, 0.2]], dtype=torch.float64)

    def field(z, t):
        return z @ a.T

    x = torch.randn(64, 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    result = ode_log_likelihood(field, x, SolverConfig("rk4", steps=10), divergence="hutchinson",
                                probe="gaussian", generator=gen)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(result.trace_integral, ((v @ a.T) * v).sum(1), atol=1e-10)


def test_adjoint_and_direct_gradients_agree():
    torch.manual_seed(0)
    net = ConcatSquashMLP((2,), hidden=16, depth=2, activation="tanh").double()
    x = torch.randn(16, 2, dtype=torch.float64)
    grads = {}
    for adjoint in (False, True):
        net.zero_grad()
        solver = SolverConfig(method="dopri5", rtol=1e-8, atol=1e-8, adjoint=adjoint)
        result = ode_log_likelihood(net, x, solver, kinetic_energy=True)
        (-result.log_prob.mean() + 0.1 * result.kinetic_energy.mean()).backward()
        grads[adjoint] = torch.cat([p.grad.flatten() for p in net.parameters()])
        assert (result.solution.nfe_backward > 0) == adjoint
    relative = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert relative < 1e-4


def test_step_cap_raises_quickly_in_the_forward_solve():
    stiff = DiagonalLinearField((-2000.0, 1.0))  # explicit solvers need ~1000s of steps here
    x = torch.ones(4, 2, dtype=torch.float64)
    start = time.perf_counter()
    with pytest.raises(ODEStepLimitExceeded, match="max_nfe=60"):
        ode_log_likelihood(stiff, x, SolverConfig(method="dopri5", rtol=1e-10, atol=1e-10, max_nfe=60))
    assert time.perf_counter() - start < 5.0


def test_step_cap_bounds_the_adjoint_backward_pass():
    torch.manual_seed(0)
    net = ConcatSquashMLP((2,), hidden=8, depth=1).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    # 10 Euler steps forward fit the cap of 15; the adjoint pass needs 10 more and must stop at 15.
    solver = SolverConfig(method="euler", steps=10, max_nfe=15, adjoint=True)
    result = ode_log_likelihood(net, x, solver)
    assert result.nfe == 10
    start = time.perf_counter()
    with pytest.raises(ODEStepLimitExceeded, match="adjoint backward pass"):
        result.log_prob.sum().backward()
    assert time.perf_counter() - start < 5.0


def test_nfe_counts_forward_and_backward():
    torch.manual_seed(0)
    net = ConcatSquashMLP((2,), hidden=8, depth=1)
    x = torch.randn(4, 2)
    direct = integrate(net, x, SolverConfig("rk4", steps=5), 0.0, 1.0)
    direct.states.sum().backward()
    assert (direct.nfe, direct.nfe_backward) == (20, 0)
    adjoint = integrate(net, x, SolverConfig("rk4", steps=5, adjoint=True), 0.0, 1.0)
    adjoint.states.sum().backward()
    assert adjoint.nfe == 20 and adjoint.nfe_backward == 20


def test_adjoint_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        ode_log_likelihood(lambda z, t: z, torch.zeros(2, 2), SolverConfig(adjoint=True))
    with pytest.raises(ValueError, match="exact, hutchinson"):
        ode_log_likelihood(lambda z, t: z, torch.zeros(2, 2), SolverConfig(), divergence="trace")


def test_likelihood_works_under_inference_mode_without_storing_graphs():
    net = ConcatSquashMLP((2,), hidden=8, depth=1)
    x = torch.randn(8, 2)
    with torch.inference_mode():
        under_inference = ode_log_likelihood(net, x, SolverConfig("rk4", steps=4)).log_prob
    with torch.no_grad():
        under_no_grad = ode_log_likelihood(net, x, SolverConfig("rk4", steps=4)).log_prob
    assert not under_no_grad.requires_grad
    torch.testing.assert_close(under_inference, under_no_grad)
