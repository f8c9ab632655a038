"""Class-conditional GAN (issue 14): the projection discriminator's class term, a generator that follows the
label, both networks updated on labelled batches (both losses, spectral norm, R1). DDP: test_conditional_ddp.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_flows.models.gan import GAN

C = 4
NETWORKS = [("mlp", (3,), False), ("conv", (1, 8, 8), False), ("conv", (1, 8, 8), True)]


def conditional_gan(network, shape, spectral_norm=False, **kwargs):
    torch.manual_seed(0)
    return GAN(shape, network=network, latent_dim=4, hidden=16, depth=2, base_channels=4, num_classes=C,
               spectral_norm=spectral_norm, **kwargs)


@pytest.mark.parametrize("network,shape,spectral_norm", NETWORKS)
def test_projection_term_is_exactly_the_inner_product_of_class_embedding_and_features(network, shape, spectral_norm):
    model = conditional_gan(network, shape, spectral_norm).eval()  # eval: spectral norm's power iteration frozen
    x = torch.rand(6, *shape) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    with torch.no_grad():
        features = model.discriminator_features(x)
        embedding = model.class_projection.weight  # the spectrally normalised weight when spectral_norm
        projection = (embedding[y] * features).sum(-1)
        # psi(phi(x)) is the unconditional discriminator network itself, D(x, y) adds <embed(y), phi(x)>.
        torch.testing.assert_close(model.critic(x, y), model.discriminator(x).reshape(-1) + projection)
        torch.testing.assert_close(model.critic(x, y) - model.critic(x, (y + 1) % C),
                                   ((embedding[y] - embedding[(y + 1) % C]) * features).sum(-1))
    assert features.shape == (6, model.class_projection.weight.shape[1])


@pytest.mark.parametrize("network,shape,spectral_norm", NETWORKS[:2])
def test_the_generator_of_class_c_changes_with_c(network, shape, spectral_norm):
    model = conditional_gan(network, shape).eval()
    z = torch.randn(5, 4)
    outputs = [model(z, torch.full((5,), c)) for c in range(C)]
    for a in range(C):
        for b in range(a + 1, C):
            assert not torch.allclose(outputs[a], outputs[b]), (a, b)
    torch.manual_seed(3)
    drawn = model.sample(5, torch.full((5,), 2))
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, model(torch.randn(5, 4), torch.full((5,), 2)))  # sample(y) = G(z, y)
    assert model.sample(6).shape == (6, *shape)  # no labels: the model draws classes itself


@pytest.mark.parametrize("network,shape,loss,spectral_norm,r1_gamma", [
    ("mlp", (3,), "non_saturating", False, 1.0), ("mlp", (3,), "hinge", True, 0.0),
    ("conv", (1, 8, 8), "hinge", True, 1.0), ("conv", (1, 8, 8), "non_saturating", False, 0.0)])
def test_each_labelled_step_updates_both_networks_and_the_class_embedding(network, shape, loss, spectral_norm,
                                                                          r1_gamma):
    model = conditional_gan(network, shape, spectral_norm, loss=loss, r1_gamma=r1_gamma, lr_g=1e-2, lr_d=1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.rand(64, *shape) * 2 - 1, torch.arange(64) % C
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    assert trainer.global_step == 2  # one batch: one discriminator and one generator step
    weights = [name for name, value in model.named_parameters() if value.ndim >= 2]
    for prefix in ("generator.", "discriminator.", "class_projection."):
        assert any(n.startswith(prefix) for n in weights), prefix
    for name in weights:
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before[name]), f"{name} not updated"
    opt_d, opt_g = model.configure_optimizers()
    assert {id(p) for p in model.class_projection.parameters()} <= {id(p) for p in opt_d.param_groups[0]["params"]}
    assert not {id(p) for p in model.class_projection.parameters()} & {id(p) for p in opt_g.param_groups[0]["params"]}


def test_num_classes_zero_keeps_todays_gan_and_labels_are_checked():
    torch.manual_seed(0)
    plain = GAN((1, 8, 8), base_channels=4)
    torch.manual_seed(0)
    zero = GAN((1, 8, 8), base_channels=4, num_classes=0)
    assert list(zero.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(zero.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert not hasattr(zero, "class_projection")
    with pytest.raises(ValueError, match="unconditional.*data.conditional: true"):
        plain.sample(2, torch.zeros(2, dtype=torch.long))
    conditional = conditional_gan("mlp", (3,))
    with pytest.raises(ValueError, match="batch without labels"):
        conditional.training_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        conditional.sample(2, guidance=4.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        conditional.sample(2, torch.tensor([0, 4]))
