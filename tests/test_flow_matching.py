"""Flow matching as the lecture defines it: path, target, objective, sampling and NFE."""

import pytest
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.metrics import energy_distance
from lightning_flows.models import FlowMatching
from lightning_flows.models.flow_matching import linear_path
from lightning_flows.ode import SolverConfig


def test_linear_path_endpoints_and_velocity():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    xt, v = linear_path(x0, x1, torch.zeros(5))
    assert torch.equal(xt, x0) and torch.equal(v, x1 - x0)
    xt, _ = linear_path(x0, x1, torch.ones(5))
    assert torch.allclose(xt, x1)
    t = torch.rand(5)
    xt, _ = linear_path(x0, x1, t)
    assert torch.allclose(xt, (1 - t[:, None]) * x0 + t[:, None] * x1)


def test_objective_is_the_velocity_regression():
    # With a field that returns exactly x1 - x0 for this draw, the loss is zero; verify through the
    # same random draws the model makes.
    model = FlowMatching(data_shape=(2,), hidden=8, depth=1)
    x1 = torch.randn(16, 2)
    torch.manual_seed(0)
    x0 = torch.randn_like(x1)
    t = torch.rand(16)
    xt, target = linear_path(x0, x1, t)
    expected = (model.velocity(xt, t) - target).pow(2).mean()
    torch.manual_seed(0)
    assert torch.allclose(model.training_loss(x1), expected)


@pytest.mark.parametrize("method,steps,nfe", [("euler", 10, 10), ("midpoint", 10, 20), ("rk4", 5, 20)])
def test_sampling_counts_function_evaluations(method, steps, nfe):
    model = FlowMatching(data_shape=(1, 8, 8), base_channels=8, channel_mults=(1, 2))
    x = model.sample(3, solver=SolverConfig(method, steps=steps))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    assert model.last_sample_nfe == nfe


def test_short_training_moves_samples_to_the_8_gaussians():
    torch.manual_seed(0)
    dm = GenerativeDataModule("8gaussians", batch_size=256)
    model = FlowMatching(data_shape=(2,), hidden=64, depth=2, lr=3e-3,
                         sampler=SolverConfig("midpoint", steps=20))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    test = dm.split("test")[:1000]
    before = energy_distance(model.sample(1000), test)
    loader = iter(dm.train_dataloader())
    for _ in range(400):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            batch = next(loader)
        loss = model.training_loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = energy_distance(model.sample(1000), test)
    assert after < 0.1 * before and after < 0.05, (before, after)


def test_hutchinson_log_prob_is_an_unbiased_estimate_of_the_exact_one():
    torch.manual_seed(0)
    solver = {"method": "rk4", "steps": 8}
    exact = FlowMatching(data_shape=(4,), hidden=16, depth=1, likelihood_solver=solver)
    estimate = FlowMatching(data_shape=(4,), hidden=16, depth=1, likelihood_solver=solver,
                            likelihood_divergence="hutchinson")
    estimate.load_state_dict(exact.state_dict())
    x = torch.randn(1, 4).expand(4000, 4).contiguous()  # one point, 4000 independent probes
    with torch.no_grad():
        reference = exact.log_prob(x[:1]).item()
        draws = estimate.log_prob(x).double()
    standard_error = draws.std().item() / len(draws) ** 0.5
    assert draws.std() > 0  # the probes really vary
    assert abs(draws.mean().item() - reference) < 4 * standard_error + 1e-6


def test_unknown_likelihood_divergence_is_rejected():
    with pytest.raises(ValueError, match="likelihood_divergence must be 'auto', 'exact' or 'hutchinson'"):
        FlowMatching(data_shape=(2,), likelihood_divergence="trace")


def test_auto_likelihood_is_exact_up_to_the_threshold_and_a_labelled_estimate_above():
    small = FlowMatching(data_shape=(1, 8, 8), base_channels=8, channel_mults=(1, 2))
    large = FlowMatching(data_shape=(1, 16, 16), base_channels=8, channel_mults=(1, 2))
    assert (small.likelihood_divergence, small.likelihood_kind) == ("exact", "exact")
    assert (large.likelihood_divergence, large.likelihood_kind) == ("hutchinson", "estimate")
    assert set(large.likelihood_estimators()) == {"estimate"}
    forced = FlowMatching(data_shape=(1, 16, 16), base_channels=8, channel_mults=(1, 2),
                          likelihood_divergence="exact")
    assert forced.likelihood_kind == "exact"
    lower = FlowMatching(data_shape=(1, 8, 8), base_channels=8, channel_mults=(1, 2), exact_likelihood_max_dim=16)
    assert lower.likelihood_kind == "estimate"


def test_exact_log_prob_with_chunked_trace_equals_the_unchunked_one():
    torch.manual_seed(0)
    solver = {"method": "rk4", "steps": 2}
    whole = FlowMatching(data_shape=(1, 4, 4), base_channels=8, channel_mults=(1, 2), likelihood_solver=solver,
                         trace_chunk_size=None).double()
    chunked = FlowMatching(data_shape=(1, 4, 4), base_channels=8, channel_mults=(1, 2), likelihood_solver=solver,
                           trace_chunk_size=3).double()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(chunked.log_prob(x), whole.log_prob(x), atol=1e-10, rtol=0)
