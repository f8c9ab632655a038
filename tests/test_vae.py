"""VAE: the ELBO and IWAE bounds against a closed-form marginal, and a tiny CLI fit on toy2d and digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_flows.models.vae import VAE, kl_to_standard_normal

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["experiments/toy2d/vae.yaml", "experiments/digits/vae.yaml"])
def test_vae_fits_from_config_and_samples(config, tmp_path, tiny_fit):
    cli = tiny_fit(config, tmp_path)
    model, dm = cli.model, cli.datamodule
    assert cli.trainer.global_step == 2
    assert list(tmp_path.rglob("samples/*.png")), "the sample-grid callback wrote no picture"
    samples = model.sample(16)
    assert samples.shape == (16, *dm.data_shape) and torch.isfinite(samples).all()
    assert model.last_sample_nfe == 1
    if dm.is_discrete:
        pixels = dm.to_pixels(samples)
        assert pixels.min() >= 0 and pixels.max() <= 1
    nll = -model.log_prob(dm.split("val")[:32])
    assert nll.shape == (32,) and torch.isfinite(dm.bits_per_dim(nll)).all()


def test_iwae_is_above_elbo_and_grows_with_k():
    torch.manual_seed(0)
    model = VAE((2,), latent_dim=2, network="mlp", hidden=32, depth=2, decoder_scale="global")
    with torch.no_grad():
        # A decoder that depends strongly on z and an untrained encoder: a wide gap for IWAE to close.
        model.decoder[0].weight.mul_(3.0)
        model.decoder_log_scale.fill_(math.log(0.3))
        x = model.decode(torch.randn(1000, 2))[0] + 0.3 * torch.randn(1000, 2)
        elbo = model.elbo(x).mean()
        bounds = [model.iwae_bound(x, k).mean() for k in (1, 8, 64)]
    # IWAE_1 and the closed-form-KL ELBO estimate the same quantity.
    assert abs(bounds[0] - elbo) < 0.1
    assert elbo < bounds[1] < bounds[2], (elbo, bounds)
    assert bounds[2] > elbo + 0.3


def linear_gaussian_vae(data_dim: int = 4, latent_dim: int = 2, noise_std: float = 0.3, seed: int = 0):
    """A linear-Gaussian VAE ``x = W z + b + noise_std * e`` (marginal ``N(b, W W^T + noise_std^2 I)``)
    with columns of ``W`` orthogonal, so the exact posterior is a diagonal Gaussian. Returns the
    model, ``W``, ``b``."""
    gen = torch.Generator().manual_seed(seed)
    model = VAE((data_dim,), latent_dim=latent_dim, network="mlp", depth=0, decoder_scale="global")
    q, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=gen))
    w = q * torch.tensor([1.5, 0.7])[:latent_dim]
    b = torch.randn(data_dim, generator=gen)
    with torch.no_grad():
        model.decoder[0].weight.copy_(w)
        model.decoder[0].bias.copy_(b)
        model.decoder_log_scale.fill_(math.log(noise_std))
    return model, w, b


def marginal_log_prob(x, w, b, noise_std):
    cov = w @ w.T + noise_std ** 2 * torch.eye(len(b))
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def set_exact_posterior_encoder(model, w, b, noise_std):
    """q(z | x) = p(z | x) = N(M^-1 W^T (x - b), noise_std^2 M^-1) with M = W^T W + noise_std^2 I (diagonal)."""
    m_diag = (w * w).sum(0) + noise_std ** 2
    gain = w.T / m_diag[:, None]
    latent = w.shape[1]
    with torch.no_grad():
        layer = model.encoder[0]
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[:latent] = gain
        layer.bias[:latent] = -gain @ b
        layer.bias[latent:] = 0.5 * torch.log(noise_std ** 2 / m_diag)


def test_linear_gaussian_vae_bounds_approach_the_closed_form_marginal():
    torch.manual_seed(1)
    noise_std = 0.3
    model, w, b = linear_gaussian_vae(noise_std=noise_std)
    z = torch.randn(500, 2)
    x = z @ w.T + b + noise_std * torch.randn(500, 4)
    exact = marginal_log_prob(x, w, b, noise_std).mean()
    with torch.no_grad():
        elbo = model.elbo(x).mean()  # random linear encoder: a loose bound
        gaps = {k: (exact - model.iwae_bound(x, k).mean()).item() for k in (1, 10, 100, 1000)}
    assert exact > elbo + 0.5
    assert all(gap > -0.02 for gap in gaps.values()), gaps  # never above log p(x) beyond noise
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000]
    assert gaps[1000] < 0.25 * gaps[1], gaps

    # With the exact posterior as encoder every importance weight p(x, z) / q(z | x) equals p(x):
    # the IWAE estimate is exact for every example and K, and the ELBO is tight on average (its
    # one-sample reconstruction term still fluctuates).
    set_exact_posterior_encoder(model, w, b, noise_std)
    with torch.no_grad():
        exact_each = marginal_log_prob(x, w, b, noise_std)
        torch.testing.assert_close(model.iwae_bound(x, 1), exact_each, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(model.iwae_bound(x, 5), exact_each, atol=1e-3, rtol=1e-4)
        assert abs(model.elbo(x).mean() - exact) < 0.1


def test_kl_to_standard_normal_matches_torch():
    mean, log_scale = torch.randn(8, 3), 0.3 * torch.randn(8, 3)
    q = torch.distributions.Normal(mean, log_scale.exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(kl_to_standard_normal(mean, log_scale),
                               torch.distributions.kl_divergence(q, p).sum(-1))


def test_vae_rejects_bad_options():
    with pytest.raises(ValueError, match="decoder_scale"):
        VAE((2,), decoder_scale="learned")
    with pytest.raises(ValueError, match="network"):
        VAE((2,), network="transformer")
    with pytest.raises(ValueError, match="shape"):
        VAE((2,)).log_prob(torch.zeros(3, 1, 8, 8))


@pytest.mark.parametrize("decoder", ["discretized_logistic", "categorical"])
def test_discrete_decoder_bounds_keep_their_order(decoder):
    """ELBO = IWAE_1 <= IWAE_8 <= IWAE_64 <= log P(k), with the discrete decoders' piecewise-constant density."""
    torch.manual_seed(0)
    model = VAE((6,), data_levels=5, latent_dim=2, network="mlp", hidden=32, depth=1, decoder=decoder,
                decoder_scale="predicted", sample_mode="sample")
    with torch.no_grad():
        model.decoder[-1].weight.mul_(2.0)  # a decoder that depends strongly on z: a gap for IWAE to close
        x = model.sample(2000)
        elbo = model.elbo(x).mean()
        bounds = [model.iwae_bound(x, k).mean() for k in (1, 8, 64)]
    assert abs(bounds[0] - elbo) < 0.25  # same expectation; the Monte Carlo error of the mean is ~0.06
    assert elbo + 0.3 < bounds[1] < bounds[2], (elbo, bounds)


@pytest.mark.parametrize("decoder", ["discretized_logistic", "categorical"])
@pytest.mark.parametrize("mode", ["mean", "sample"])
def test_discrete_decoder_samples_live_in_model_space(decoder, mode):
    model = VAE((1, 8, 8), data_levels=17, latent_dim=4, decoder=decoder, decoder_scale="predicted",
                sample_mode=mode, base_channels=8).eval()
    samples = model.sample(5)
    assert samples.shape == (5, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1
