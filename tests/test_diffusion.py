"""DDPM: the forward marginals, the variational bound with an oracle noise model, samplers, CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_flows.models.diffusion import Diffusion, cosine_betas, ddim_timesteps, linear_betas

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
    sampled = oracle_model("cosine", 100, 2, 1.0, bound_timesteps=10).variational_bound(x).mean()
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


@pytest.mark.parametrize("config", ["experiments/toy2d/diffusion.yaml", "experiments/digits/diffusion.yaml"])
def test_diffusion_fits_from_config_and_samples(config, tmp_path, tiny_fit):
    # Few sampling steps keep the test quick; the sample grid still goes through the configured sampler.
    cli = tiny_fit(config, tmp_path, "--model.init_args.sample_steps", "10", "--model.init_args.num_steps", "100")
    model, dm = cli.model, cli.datamodule
    assert cli.trainer.global_step == 2
    assert list(tmp_path.rglob("samples/*.png")), "the sample-grid callback wrote no picture"
    samples = model.sample(8, sampler="ddim", steps=5)
    assert samples.shape == (8, *dm.data_shape) and torch.isfinite(samples).all()
    assert model.last_sample_nfe == 5
    if dm.is_discrete:  # clipped x0 predictions keep images in model space
        assert samples.min() >= -1 and samples.max() <= 1
    model.bound_timesteps = 2
    nll = -model.log_prob(dm.split("val")[:8])
    assert nll.shape == (8,) and torch.isfinite(dm.bits_per_dim(nll)).all()


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="schedule"):
        Diffusion((2,), schedule="quadratic")
    with pytest.raises(ValueError, match="sampler"):
        Diffusion((2,), sampler="euler")
