"""Class-conditional RealNVP, Glow and NSF (issue 14): exact log p(x | y), the marginal over classes, sampling
from the requested class's base, unconditional models unchanged, training on (x, y) batches."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_flows.models import NSF, Glow, RealNVP

SMALL = dict(steps=2, hidden=8, depth=2)
FAMILIES = {"realnvp": (RealNVP, {}), "glow": (Glow, {}), "nsf": (NSF, dict(spline_bins=4))}
K = 3


def build(family: str, shape=(2,), num_classes: int = K, seed: int = 0, **extra):
    """A small float64 model, ActNorm initialised on data and every weight (the per-class base too) nudged."""
    cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(data_shape=shape, num_classes=num_classes, **SMALL, **kwargs, **extra).double().train()
    x = examples(shape, 64, seed + 1)
    labels = torch.arange(64) % K if num_classes else None
    model.log_prob(x, labels)  # data-dependent ActNorm init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def examples(shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.95


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_log_p_x_given_y_is_the_class_base_density_times_the_autograd_jacobian(family):
    model = build(family)
    base = model.flow.base
    x = examples((2,), 6, seed=7)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    for i in range(x.shape[0]):
        xi = x[i]
        z = model.flow(xi[None])[0][0]
        jacobian = torch.autograd.functional.jacobian(lambda v: model.flow(v[None])[0][0], xi)
        class_base = torch.distributions.Normal(base.loc[y[i]], base.log_scale[y[i]].exp())
        expected = class_base.log_prob(z).sum() + torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(model.log_prob(xi[None], y[i:i + 1])[0], expected.detach(), rtol=0, atol=1e-9)
    # The classes' bases differ, so the label matters.
    assert not torch.allclose(model.log_prob(x, torch.zeros(6, dtype=torch.long)),
                              model.log_prob(x, torch.ones(6, dtype=torch.long)))


@pytest.mark.parametrize("family,shape", [("realnvp", (2,)), ("glow", (1, 4, 4)), ("nsf", (1, 4, 4))])
def test_log_p_x_is_the_explicit_sum_over_classes_with_the_uniform_prior(family, shape):
    model = build(family, shape)
    x = examples(shape, 5, seed=3)
    per_class = [model.log_prob(x, torch.full((5,), c)) for c in range(K)]
    shift = torch.stack(per_class).max(0).values  # image densities underflow: sum exp(lp - shift), add it back
    explicit = shift + torch.log(sum(torch.exp(lp - shift) for lp in per_class) / K)
    torch.testing.assert_close(model.log_prob(x), explicit, rtol=0, atol=1e-9)


def test_conditional_2d_densities_each_integrate_to_one():
    model = build("realnvp", num_classes=K)
    grid = torch.linspace(-8, 8, 321, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    cell = (grid[1] - grid[0]) ** 2
    for c in range(K):
        mass = (model.log_prob(points, torch.full((points.shape[0],), c)).exp().sum() * cell).item()
        assert mass == pytest.approx(1.0, abs=2e-2), c


@pytest.mark.parametrize("family,shape", [("realnvp", (2,)), ("glow", (1, 4, 4)), ("nsf", (1, 4, 4))])
def test_samples_of_class_c_are_the_inverse_flow_of_class_c_base_draws(family, shape):
    model = build(family, shape, preprocess="none")  # the logit would saturate on the nudged bases' far draws
    y = torch.tensor([2, 0, 1, 2])
    torch.manual_seed(11)
    eps = torch.randn(4, *shape, dtype=torch.float64)
    torch.manual_seed(11)
    x = model.sample(4, y)
    z = model.flow(x)[0]
    base = model.flow.base
    torch.testing.assert_close((z - base.loc[y]) / base.log_scale[y].exp(), eps, rtol=0, atol=1e-6)
    assert model.last_sample_nfe == 1
    # Without labels, a conditional model draws classes itself and still returns samples of the data's shape.
    assert model.sample(7).shape == (7, *shape)


@pytest.mark.parametrize("family,shape", [("realnvp", (1, 4, 4)), ("glow", (1, 4, 4)), ("nsf", (2,))])
def test_num_classes_zero_keeps_todays_state_dict_and_a_conditional_model_starts_as_it(family, shape):
    cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    plain = cls(data_shape=shape, **SMALL, **kwargs)
    torch.manual_seed(0)
    zero = cls(data_shape=shape, num_classes=0, **SMALL, **kwargs)
    torch.manual_seed(0)
    conditional = cls(data_shape=shape, num_classes=K, **SMALL, **kwargs)
    assert not any("base" in key for key in plain.state_dict())
    assert list(zero.state_dict()) == list(plain.state_dict())
    assert set(conditional.state_dict()) - set(plain.state_dict()) == {"flow.base.loc", "flow.base.log_scale"}
    for key, value in plain.state_dict().items():  # the per-class base draws no random numbers
        assert torch.equal(zero.state_dict()[key], value) and torch.equal(conditional.state_dict()[key], value), key
    # Each class's base starts as the standard normal: log p(x | y) = log p(x) of the unconditional model.
    x = examples(shape, 4).float()
    for model in (plain, zero, conditional):
        model.eval()
    expected = plain.log_prob(x)
    assert torch.equal(zero.log_prob(x), expected)
    torch.testing.assert_close(conditional.log_prob(x, torch.tensor([0, 1, 2, 0])), expected)
    torch.testing.assert_close(conditional.log_prob(x), expected)  # the marginal of K identical classes


def test_labels_and_guidance_are_checked_with_the_fix_named():
    conditional, plain = build("realnvp"), build("realnvp", num_classes=0)
    x = examples((2,), 4)
    with pytest.raises(ValueError, match="unconditional.*data.conditional: true"):
        plain.log_prob(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        plain.sample(4, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conditional.log_prob(x, torch.full((4,), 3))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        conditional.sample(4, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        conditional.log_prob(x, torch.zeros(4))
    with pytest.raises(ValueError, match="no classifier-free guidance.*guidance=1.0"):
        conditional.sample(4, guidance=2.0)
    with pytest.raises(ValueError, match="batch without labels.*data.conditional: true"):
        conditional.training_loss(x)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        RealNVP((2,), num_classes=-1)


def test_a_conditional_flow_trains_on_labelled_batches_and_validates_on_the_marginal():
    torch.manual_seed(0)
    # Three classes, three well-separated Gaussian blobs: conditioning should learn where each class lives.
    y = torch.arange(600) % K
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = centres[y] + 0.3 * torch.randn(600, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    model = RealNVP((2,), num_classes=K, steps=4, hidden=32, lr=1e-2)
    trainer = L.Trainer(max_epochs=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader, DataLoader(TensorDataset(x[:200], y[:200]), batch_size=200))
    model.eval()
    with torch.no_grad():
        marginal, given_class = -model.log_prob(x[:200]).mean(), -model.log_prob(x[:200], y[:200]).mean()
    torch.testing.assert_close(trainer.callback_metrics["val/nll"], marginal)
    torch.testing.assert_close(trainer.callback_metrics["val/nll_given_class"], given_class)
    # log p(x | y) - log p(x) = log p(y | x) - log p(y) <= log K, with equality when the class is certain.
    assert (marginal - given_class).item() == pytest.approx(math.log(K), abs=0.05)
    # Samples of class c land at blob c.
    for c in range(K):
        samples = model.sample(200, torch.full((200,), c))
        nearest = torch.cdist(samples, centres).argmin(1)
        assert (nearest == c).float().mean() > 0.9, c
