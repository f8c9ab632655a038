"""Conditional VAE (issue 14): the bounds of log p(x | y) and of the marginal against a closed-form linear-Gaussian
CVAE, the label reaching encoder and decoder (MLP and conv), unconditional models unchanged, training on (x, y)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_flows.models.vae import VAE

C = 3


def linear_gaussian_cvae(data_dim=4, latent_dim=2, noise_std=0.3, seed=0):
    """``x = W z + V onehot(y) + b + noise_std e``: ``p(x | y) = N(b + V[:, y], W W^T + noise_std^2 I)``, with ``W``'s
    columns orthogonal so that the exact posterior is a diagonal Gaussian, and the encoder set to it."""
    gen = torch.Generator().manual_seed(seed)
    model = VAE((data_dim,), latent_dim=latent_dim, network="mlp", depth=0, decoder_scale="global",
                num_classes=C).double()
    q, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=gen, dtype=torch.float64))
    w = q * torch.tensor([1.5, 0.7], dtype=torch.float64)
    v = 2.0 * torch.randn(data_dim, C, generator=gen, dtype=torch.float64)
    b = torch.randn(data_dim, generator=gen, dtype=torch.float64)
    # Exact posterior q(z | x, y) = N(G (x - b - V[:, y]), noise_std^2 M^-1), G = M^-1 W^T, M = W^T W + s^2 I.
    m_diag = (w * w).sum(0) + noise_std ** 2
    gain = w.T / m_diag[:, None]
    with torch.no_grad():
        model.decoder[0].weight.copy_(torch.cat([w, v], 1))
        model.decoder[0].bias.copy_(b)
        model.decoder_log_scale.fill_(math.log(noise_std))
        encoder = model.encoder[0]
        encoder.weight.zero_()
        encoder.bias.zero_()
        encoder.weight[:latent_dim, :data_dim] = gain
        encoder.weight[:latent_dim, data_dim:] = -gain @ v
        encoder.bias[:latent_dim] = -gain @ b
        encoder.bias[latent_dim:] = 0.5 * torch.log(noise_std ** 2 / m_diag)
    cov = w @ w.T + noise_std ** 2 * torch.eye(data_dim, dtype=torch.float64)
    classes = [torch.distributions.MultivariateNormal(b + v[:, c], covariance_matrix=cov) for c in range(C)]
    return model, classes


def test_iwae_is_exact_log_p_x_given_y_and_the_marginal_is_the_uniform_mixture():
    torch.manual_seed(0)
    model, classes = linear_gaussian_cvae()
    y = torch.arange(30) % C
    x = torch.stack([classes[c].sample() for c in y.tolist()])
    exact_given_y = torch.stack([classes[c].log_prob(xi) for c, xi in zip(y.tolist(), x)])
    exact_marginal = torch.logsumexp(torch.stack([d.log_prob(x) for d in classes]), 0) - math.log(C)
    with torch.no_grad():
        # With the exact posterior every importance weight p(x, z | y) / q(z | x, y) equals p(x | y).
        torch.testing.assert_close(model.iwae_bound(x, 3, y), exact_given_y)
        torch.testing.assert_close(model.log_prob(x, y), exact_given_y)
        torch.testing.assert_close(model.log_prob(x), exact_marginal)
        # The ELBO given y is tight on average (its one-sample reconstruction term still fluctuates).
        assert abs(model.elbo(x, y).mean() - exact_given_y.mean()) < 0.1
        # A worse encoder only loosens the bounds: still below the exact values, IWAE tighter than the ELBO.
        model.encoder[0].weight.add_(0.3 * torch.randn_like(model.encoder[0].weight))
        iwae = model.iwae_bound(x, 200, y).mean()
        assert model.elbo(x, y).mean() < iwae < exact_given_y.mean() + 0.02
        assert model.log_prob(x).mean() < exact_marginal.mean() + 0.02


@pytest.mark.parametrize("network,shape", [("mlp", (4,)), ("conv", (1, 8, 8))])
def test_the_label_reaches_encoder_and_decoder(network, shape):
    torch.manual_seed(0)
    model = VAE(shape, latent_dim=3, network=network, hidden=16, base_channels=4, num_classes=C, iwae_k=2).eval()
    x = torch.rand(5, *shape) * 2 - 1
    zeros, ones = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    assert not torch.allclose(model.encode(x, zeros)[0], model.encode(x, ones)[0])
    z = torch.randn(5, 3)
    assert not torch.allclose(model.decode(z, zeros)[0], model.decode(z, ones)[0])
    torch.manual_seed(1)
    a = model.sample(5, zeros)
    torch.manual_seed(1)
    b = model.sample(5, ones)
    assert a.shape == (5, *shape) and not torch.allclose(a, b)  # same z, different class
    assert model.sample(4).shape == (4, *shape)  # no labels: the model draws classes itself
    assert model.log_prob(x).shape == (5,)


@pytest.mark.parametrize("network,shape", [("mlp", (4,)), ("conv", (1, 8, 8))])
def test_num_classes_zero_keeps_todays_model(network, shape):
    torch.manual_seed(0)
    plain = VAE(shape, network=network, hidden=16, base_channels=4)
    torch.manual_seed(0)
    zero = VAE(shape, network=network, hidden=16, base_channels=4, num_classes=0)
    assert list(zero.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(zero.state_dict()[k], v) for k, v in plain.state_dict().items())
    conditional = VAE(shape, network=network, hidden=16, base_channels=4, num_classes=C)
    assert list(conditional.state_dict()) == list(plain.state_dict())  # same layers, wider inputs


def test_labels_and_guidance_are_checked_with_the_fix_named():
    conditional, plain = VAE((4,), num_classes=C, hidden=8), VAE((4,), hidden=8)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="unconditional.*data.conditional: true"):
        plain.log_prob(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch without labels"):
        conditional.training_loss(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conditional.sample(3, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        conditional.sample(3, guidance=0.0)


def test_a_cvae_trains_on_labelled_batches_and_draws_the_requested_class():
    torch.manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(600) % C
    x = centres[y] + 0.3 * torch.randn(600, 2)
    model = VAE((2,), latent_dim=2, network="mlp", hidden=32, depth=2, num_classes=C, lr=1e-2, iwae_k=4)
    trainer = L.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True),
                DataLoader(TensorDataset(x[:100], y[:100]), batch_size=100))
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    model.eval()
    for c in range(C):
        samples = model.sample(200, torch.full((200,), c))
        assert (torch.cdist(samples, centres).argmin(1) == c).float().mean() > 0.9, c
