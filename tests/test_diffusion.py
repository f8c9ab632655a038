"""DDPM: the forward marginals, the variational bound with an oracle noise model, samplers, CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_flows.models.diffusion import Diffusion, cosine_betas, ddim_timesteps, linear_betas
from lightning_flows.ode import SolverConfig

ROOT = Path(__file__).resolve().parents[1]


class GaussianOracle(nn.Module):
    """The exact noise prediction for data ``N(0, s^2 I)``: ``x_t ~ N(0, (alpha_bar s^2 + 1 - alpha_bar) I)``
    and ``E[eps | x_t] = sqrt(1 - alpha_bar) x_t / (alpha_bar s^2 + 1 - alpha_bar)``."""

    def __init__(self, model: Diffusion, data_std: float):
        super().__init__()
        self.alpha_bars, self.num_steps, self.data_std = model.schedule.alpha_bars, model.num_steps, data_std

    def forward(self, x, t_over_T):
        ab = self.alpha_bars[(t_over_T * self.num_steps).round().long()].reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * x / (ab * self.data_std ** 2 + 1 - ab)


def oracle_model(schedule: str, num_steps: int, dim: int, data_std: float, oracle_std: float | None = None,
                 **kwargs) -> Diffusion:
    model = Diffusion((dim,), num_steps=num_steps, schedule=schedule, hidden=8, depth=1, **kwargs)
    model.eps_model = GaussianOracle(model, data_std if oracle_std is None else oracle_std)
    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_marginal_matches_the_simulated_chain(schedule):
    """Run x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) e step by step; compare with q(x_t | x_0)."""
    torch.manual_seed(0)
    model = Diffusion((3,), num_steps=40, schedule=schedule, hidden=8, depth=1)
    x0 = torch.tensor([1.5, -0.5, 0.2])
    n = 100_000
    x = x0.expand(n, 3).clone()
    betas = model.schedule.betas
    for step in range(1, model.num_steps + 1):
        x = (1 - betas[step]).sqrt() * x + betas[step].sqrt() * torch.randn_like(x)
        if step in (1, 5, 20, 40):
            mean, std = model.schedule.q_mean_std(x0[None], torch.tensor([step]))
            torch.testing.assert_close(x.mean(0), mean[0], atol=0.015, rtol=0)
            torch.testing.assert_close(x.var(0), std[0].expand(3) ** 2, atol=0.015, rtol=0.02)


def test_schedules_follow_their_definitions():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert linear_betas(100)[-1].item() == pytest.approx(0.2)  # rescaled by 1000 / T
    T, s = 200, 0.008
    alpha_bar = torch.cumprod(1 - cosine_betas(T, offset=s), 0)
    t = torch.arange(1, T, dtype=torch.float64) / T  # the last step is clipped at max_beta
    expected = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(alpha_bar[:-1], expected)


def test_posterior_mean_recovers_x0_at_t1_and_the_training_target_is_the_noise():
    model = Diffusion((2,), num_steps=50, hidden=8, depth=1)
    x0, noise = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.full((4,), 1)
    xt = model.schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(model.schedule.predict_x0(xt, t, noise), x0)
    torch.testing.assert_close(model.schedule.posterior_mean(x0, xt, t), x0, atol=1e-4, rtol=1e-4)
    t = torch.full((4,), 30)
    xt = model.schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(model.schedule.eps_from_x0(xt, t, x0), noise, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_oracle_bound_is_close_to_the_true_nll(schedule):
    torch.manual_seed(0)
    dim, data_std = 4, 0.5
    x = data_std * torch.randn(4000, dim)
    true_nll = -torch.distributions.Normal(0.0, data_std).log_prob(x).sum(-1)
    model = oracle_model(schedule, 100, dim, data_std, bound_chunk=100)
    bound = model.variational_bound(x)
    gap = (bound - true_nll).mean().item()
    assert abs(gap) < 0.15, f"bound - NLL = {gap:.3f} nats for an exact noise model"
    assert torch.allclose(-model.log_prob(x[:10]).mean(), bound[:10].mean(), atol=1.0)
    # A wrong noise model (it believes the data std is 1) must pay for it in the bound.
    wrong = oracle_model(schedule, 100, dim, data_std, oracle_std=1.0, bound_chunk=100)
    assert (wrong.variational_bound(x) - true_nll).mean() > gap + 0.5


def test_monte_carlo_bound_is_unbiased():
    torch.manual_seed(0)
    x = 0.5 * torch.randn(3000, 2)
    full = oracle_model("cosine", 100, 2, 1.0, bound_chunk=100).variational_bound(x).mean()
    # Five estimates from 20 timesteps each: their mean has a standard error of ~0.03 nats here.
    model = oracle_model("cosine", 100, 2, 1.0, bound_timesteps=20, bound_chunk=20)
    sampled = torch.stack([model.variational_bound(x).mean() for _ in range(5)]).mean()
    assert abs(full - sampled) < 0.1, (full, sampled)


@pytest.mark.parametrize("sampler,steps,nfe", [("ancestral", None, 200), ("ddim", 200, 200), ("ddim", 50, 50)])
def test_oracle_samplers_reproduce_the_data_distribution_and_count_nfe(sampler, steps, nfe):
    torch.manual_seed(0)
    model = oracle_model("cosine", 200, 2, data_std=0.5)
    samples = model.sample(8_000, sampler=sampler, steps=steps)
    assert model.last_sample_nfe == nfe
    assert samples.shape == (8_000, 2)
    # Deterministic DDIM contracts the variance a little on every coarse step (Cauchy-Schwarz on
    # its update for Gaussian data), so fewer steps are allowed a wider tolerance.
    tol = 0.02 if nfe == 200 else 0.04
    torch.testing.assert_close(samples.std(0), torch.full((2,), 0.5), atol=tol, rtol=0)
    torch.testing.assert_close(samples.mean(0), torch.zeros(2), atol=0.02, rtol=0)


def test_deterministic_ddim_and_its_timesteps():
    assert ddim_timesteps(1000, 10)[-1] == 1000 and ddim_timesteps(1000, 10)[0] == 1
    assert ddim_timesteps(10, 10) == list(range(1, 11))
    model = oracle_model("linear", 100, 2, data_std=0.5)
    torch.manual_seed(3)
    a = model.sample(5, sampler="ddim", steps=10)
    torch.manual_seed(3)
    b = model.sample(5, sampler="ddim", steps=10)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="sample_steps"):
        model.sample(5, sampler="ddim", steps=500)


@pytest.mark.parametrize("config,decoder", [("experiments/toy2d/diffusion.yaml", "gaussian"),
                                            ("experiments/digits/diffusion.yaml", "gaussian"),
                                            ("experiments/digits/diffusion.yaml", "discretized")])
def test_diffusion_fits_from_config_and_samples(config, decoder, tmp_path, tiny_fit):
    # Few sampling steps keep the test quick; the sample grid still goes through the configured sampler.
    cli = tiny_fit(config, tmp_path, "--model.init_args.sample_steps", "10", "--model.init_args.num_steps", "100",
                   "--model.init_args.decoder", decoder)
    model, dm = cli.model, cli.datamodule
    assert cli.trainer.global_step == 2
    assert list(tmp_path.rglob("samples/*.png")), "the sample-grid callback wrote no picture"
    samples = model.sample(8, sampler="ddim", steps=5)
    assert samples.shape == (8, *dm.data_shape) and torch.isfinite(samples).all()
    assert model.last_sample_nfe == 5
    if dm.is_discrete:  # clipped x0 predictions keep images in model space
        assert samples.min() >= -1 and samples.max() <= 1
    model.bound_timesteps = 2
    x = dm.split("val")[:8]
    for kind in ("bound", "ode"):
        model.likelihood_solver = SolverConfig("euler", steps=4)  # the plumbing, not the accuracy
        nll = -model.log_prob(x, kind=kind)
        assert nll.shape == (8,) and torch.isfinite(dm.bits_per_dim(nll)).all()
    assert model.data_levels == dm.levels  # linked from the DataModule


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="schedule"):
        Diffusion((2,), schedule="quadratic")
    with pytest.raises(ValueError, match="sampler"):
        Diffusion((2,), sampler="euler")


# ---- the continuous-time view and the probability-flow ODE likelihood ----
class ContinuousGaussianOracle(nn.Module):
    """The exact noise prediction for data ``N(0, diag s^2)`` at continuous time ``t`` of the VP view:
    ``E[eps | x_t] = sigma(t) x_t / (alpha_bar(t) s^2 + sigma(t)^2)``."""

    def __init__(self, model: Diffusion, data_std: torch.Tensor):
        super().__init__()
        self.schedule, self.data_std = model.schedule, data_std

    def forward(self, x, t):
        alpha_bar = self.schedule.continuous_log_alpha_bar(t).exp().reshape(-1, 1)
        sigma = self.schedule.continuous_sigma(t).reshape(-1, 1)
        return sigma * x / (alpha_bar * self.data_std ** 2 + sigma ** 2)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_continuous_schedule_interpolates_the_discrete_one_smoothly(schedule):
    from scipy.interpolate import PchipInterpolator

    model = Diffusion((2,), num_steps=50, schedule=schedule, hidden=8, depth=1)
    sched = model.schedule
    grid = torch.arange(51, dtype=torch.float64) / 50
    torch.testing.assert_close(sched.continuous_log_alpha_bar(grid), sched.log_alpha_bars, atol=1e-12, rtol=0)
    t = torch.rand(500, dtype=torch.float64)
    reference = PchipInterpolator(grid.numpy(), sched.log_alpha_bars.numpy())
    torch.testing.assert_close(sched.continuous_log_alpha_bar(t), torch.from_numpy(reference(t.numpy())))
    torch.testing.assert_close(sched.continuous_beta(t), -torch.from_numpy(reference.derivative()(t.numpy())))
    assert (sched.continuous_beta(t) >= 0).all()
    # beta(t) is continuous across the grid points (no kink for an adaptive solver to trip on).
    h = 1e-9
    torch.testing.assert_close(sched.continuous_beta(grid[1:-1] - h), sched.continuous_beta(grid[1:-1] + h),
                               rtol=1e-5, atol=1e-6)
    betas = (linear_betas if schedule == "linear" else cosine_betas)(50)
    torch.testing.assert_close(sched.continuous_sigma(grid[1:]) ** 2, 1 - torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_probability_flow_likelihood_of_gaussian_data_is_the_closed_form(schedule):
    """With the exact eps-predictor for ``N(0, diag s^2)`` the probability-flow ODE is linear: it carries
    ``N(0, I)`` at ``t = 1`` to ``N(0, v(t) / v(1))`` with ``v(t) = alpha_bar(t) s^2 + sigma(t)^2``, and at
    ``t = 1 / T`` that is the data's own density up to the first step's noise."""
    torch.manual_seed(0)
    data_std = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    model = Diffusion((3,), num_steps=1000, schedule=schedule, hidden=8, depth=1, likelihood_kind="ode",
                      likelihood_solver={"method": "dopri5", "rtol": 1e-7, "atol": 1e-7, "max_nfe": 5000}).double()
    model.eps_model = ContinuousGaussianOracle(model, data_std)
    x = data_std * torch.randn(300, 3, dtype=torch.float64)
    log_prob = model.log_prob(x)
    assert model.likelihood == "exact" and model.last_log_prob_nfe < 5000

    def v(t):
        t = torch.tensor([t], dtype=torch.float64)
        alpha_bar, sigma = model.schedule.continuous_log_alpha_bar(t).exp(), model.schedule.continuous_sigma(t)
        return alpha_bar * data_std ** 2 + sigma ** 2

    closed_form = torch.distributions.Normal(0.0, (v(1 / 1000) / v(1.0)).sqrt()).log_prob(x).sum(-1)
    torch.testing.assert_close(log_prob, closed_form, atol=2e-3, rtol=0)
    data_log_density = torch.distributions.Normal(0.0, data_std).log_prob(x).sum(-1)
    assert (log_prob - data_log_density).abs().mean() < 0.01
    # Hutchinson's estimate of the same log-density is unbiased.
    model.likelihood_divergence = "hutchinson"
    estimate = model.log_prob_ode(x, SolverConfig("dopri5", rtol=1e-5, atol=1e-5))
    assert abs((estimate - closed_form).mean()) < 0.1
    # A wrong score pays for it.
    model.eps_model = ContinuousGaussianOracle(model, torch.ones(3, dtype=torch.float64))
    model.likelihood_divergence = "exact"
    assert (model.log_prob(x) - data_log_density).mean() < -0.3


def test_both_likelihoods_through_one_interface_and_a_bounded_solver():
    from lightning_flows.ode import ODEStepLimitExceeded

    x = 0.5 * torch.randn(6, 2)
    bound_model = oracle_model("cosine", 50, 2, data_std=0.5, bound_chunk=50)
    assert bound_model.likelihood == "bound" and Diffusion.LIKELIHOOD_KINDS == {"bound": "bound", "ode": "exact"}
    torch.manual_seed(0)
    bound = bound_model.log_prob(x)
    torch.manual_seed(0)
    torch.testing.assert_close(bound_model.log_prob(x, kind="bound"), bound)
    bound_model.eps_model = ContinuousGaussianOracle(bound_model, torch.full((2,), 0.5))
    exact = bound_model.log_prob(x, kind="ode")
    assert exact.shape == (6,) and torch.isfinite(exact).all() and bound_model.last_log_prob_nfe > 0
    with pytest.raises(ValueError, match="kind"):
        bound_model.log_prob(x, kind="elbo")
    capped = Diffusion((2,), num_steps=50, hidden=8, depth=1, likelihood_kind="ode",
                       likelihood_solver={"method": "dopri5", "max_nfe": 5})
    with pytest.raises(ODEStepLimitExceeded, match="max_nfe=5"):
        capped.log_prob(x)
    with pytest.raises(ValueError, match="likelihood_kind"):
        Diffusion((2,), likelihood_kind="exact")


class PointMassOracle(nn.Module):
    """The exact noise prediction for data that is always ``c``: ``eps = (x_t - sqrt(alpha_bar_t) c) / sigma_t``."""

    def __init__(self, model: Diffusion, centre: torch.Tensor):
        super().__init__()
        self.alpha_bars, self.num_steps, self.centre = model.schedule.alpha_bars, model.num_steps, centre

    def forward(self, x, t_over_T):
        ab = self.alpha_bars[(t_over_T * self.num_steps).round().long()].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - ab.sqrt() * self.centre) / (1 - ab).sqrt()


def test_discretised_bound_of_a_known_level_is_near_zero_bits():
    """Data that is always one level vector (including both edge levels): the exact model has P(k) = 1,
    and DDPM's discretised bound with the exact reverse process (posterior variances) says so, whatever
    dequantisation noise the example carries; another level costs a fortune."""
    from lightning_flows.data.quantisation import bin_centre, dequantise, unit_cube_to_model_space_log_det
    from lightning_flows.metrics import bits_per_dim

    levels = 17
    k = torch.tensor([0, 3, 8, 16])
    model = Diffusion((4,), data_levels=levels, num_steps=200, schedule="cosine", decoder="discretized",
                      reverse_variance="posterior", hidden=8, depth=1, bound_chunk=200)
    model.eps_model = PointMassOracle(model, bin_centre(k, levels))
    x = dequantise(k.expand(64, 4), torch.rand(64, 4), levels)
    def bits(bound):  # what dm.bits_per_dim does for 4-dim data with 17 levels: -log2 P(k) / D
        return bits_per_dim(bound, 4, levels, unit_cube_to_model_space_log_det(4))

    bpd = bits(model.variational_bound(x))
    assert bpd.abs().max() < 0.02, bpd  # P(k) = 1: zero bits
    other = dequantise(torch.tensor([[1, 3, 8, 16]]), torch.rand(1, 4), levels)
    assert bits(model.variational_bound(other)).item() > 5.0


def test_discretised_diffusion_trains_on_the_level_centres():
    from lightning_flows.data.quantisation import bin_centre, bin_index

    model = Diffusion((1, 8, 8), data_levels=17, decoder="discretized", num_steps=10, base_channels=8,
                      channel_mults=(1,))
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(model.diffused_data(x), bin_centre(bin_index(x, 17), 17))
    assert torch.equal(Diffusion((2,), num_steps=10, hidden=8, depth=1).diffused_data(x), x)


@pytest.mark.parametrize("num_steps,k", [(1000, 50), (11, 4), (11, 5), (20, 19), (20, 30)])
def test_bound_timesteps_weigh_every_term_once_in_expectation(num_steps, k):
    from lightning_flows.models.diffusion import bound_timestep_sample

    torch.manual_seed(0)
    t, weights = bound_timestep_sample(num_steps, k, 100_000)
    n_terms = num_steps - 1
    assert t.shape == (100_000, min(k, n_terms)) and t.min() >= 2 and t.max() <= num_steps
    # E[sum_j w_j 1{t_j = s}] = 1 for every term s: the weighted estimate of the sum is unbiased.
    expected_weight = torch.zeros(n_terms, dtype=torch.float64)
    expected_weight.index_add_(0, (t - 2).flatten(), weights.double().expand_as(t).flatten())
    width = float(weights.max())  # a tail term is drawn with probability 1 / width: 5 standard errors
    torch.testing.assert_close(expected_weight / 100_000, torch.ones(n_terms, dtype=torch.float64),
                               atol=5 * (width / 100_000) ** 0.5, rtol=0)
    head = min(k, n_terms) if k >= n_terms else k // 2
    assert torch.equal(t[:, :head], torch.arange(2, 2 + head).expand(100_000, head))  # the first terms, always
