"""ODE likelihoods are right under ``torch.inference_mode`` (where Lightning validates and tests).

The trace ``Tr(df/dz)`` comes from ``torch.func`` transforms, which need autograd; inference mode turns
autograd off and older torch versions then silently returned zero derivatives. ``ode_log_likelihood``
leaves inference mode itself, so the guarantee does not depend on the torch version or on the caller.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_flows.models import CNF, FlowMatching
from lightning_flows.ode import SolverConfig, ode_log_likelihood, standard_normal_log_prob


class LinearField(nn.Module):
    """``f(x, t) = A x``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x, t):
        return x @ self.a.T


@pytest.fixture
def old_torch_in_inference_mode(monkeypatch):
    """Emulate the torch versions whose ``torch.func`` derivatives were silently zero in inference mode.

    (The installed torch gets them right, so without this the test below could not fail.)
    """
    import lightning_flows.ode.cnf_dynamics as dynamics

    exact = dynamics.exact_divergence

    def exact_divergence(f, z, frobenius=False, chunk_size=None, colouring=None):
        out, divergence, fro = exact(f, z, frobenius, chunk_size, colouring)
        if torch.is_inference_mode_enabled():
            divergence = torch.zeros_like(divergence)
        return out, divergence, fro

    monkeypatch.setattr(dynamics, "exact_divergence", exact_divergence)


def test_linear_flow_log_likelihood_in_inference_mode_equals_the_closed_form(old_torch_in_inference_mode):
    # dx/dt = A x carries z to x = e^A z, so log p(x) = log N(e^{-A} x; 0, I) - tr(A): a zero trace from
    # a silently failed derivative would be off by tr(A) = 1.2 nats.
    torch.manual_seed(0)
    a = torch.tensor([[0.5, 0.3], [-0.2, 0.7]], dtype=torch.float64)
    field = LinearField(a)
    x = torch.randn(16, 2, dtype=torch.float64)
    expected = standard_normal_log_prob(x @ torch.linalg.matrix_exp(-a).T) - torch.trace(a)
    with torch.inference_mode():
        result = ode_log_likelihood(field, x, SolverConfig(method="rk4", steps=40), divergence="exact")
    torch.testing.assert_close(result.log_prob, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(result.trace_integral, torch.full((16,), math.fsum(a.diagonal().tolist()),
                                                                   dtype=torch.float64), atol=1e-9, rtol=0)
    assert not result.log_prob.requires_grad  # still nothing stored for backward


@pytest.mark.parametrize("family", [CNF, FlowMatching])
def test_family_log_prob_is_the_same_in_inference_mode_and_outside(family):
    torch.manual_seed(0)
    model = family((2,), hidden=16, depth=2).eval()
    x = torch.randn(8, 2)
    with torch.no_grad():
        outside = model.log_prob(x)
    with torch.inference_mode():
        inside = model.log_prob(x)
        inside_inference_input = model.log_prob(torch.randn(8, 2).copy_(x))  # an inference tensor as input
    torch.testing.assert_close(inside, outside, atol=1e-6, rtol=0)
    torch.testing.assert_close(inside_inference_input, outside, atol=1e-6, rtol=0)
