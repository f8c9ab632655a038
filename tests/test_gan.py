"""GAN: losses in closed form, the R1 penalty, manual optimisation updating both networks, CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_flows.data import GenerativeDataModule
from lightning_flows.models.gan import GAN, discriminator_loss, generator_loss, r1_penalty

ROOT = Path(__file__).resolve().parents[1]


def test_losses_at_an_undecided_discriminator():
    zeros = torch.zeros(10)
    assert discriminator_loss(zeros, zeros, "non_saturating").item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zeros, "non_saturating").item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros, "hinge").item() == pytest.approx(2.0)
    # Hinge saturates once the margin is met: a confident, correct critic has zero loss.
    assert discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -3.0), "hinge").item() == 0.0


def test_r1_penalty_of_a_linear_critic_is_its_squared_weight_norm():
    critic = nn.Linear(3, 1)
    expected = critic.weight.pow(2).sum()
    torch.testing.assert_close(r1_penalty(critic, torch.randn(7, 3)), expected)
    r1_penalty(critic, torch.randn(7, 3)).backward()  # differentiable w.r.t. the critic's weights
    torch.testing.assert_close(critic.weight.grad, 2 * critic.weight.detach())


@pytest.mark.parametrize("loss,spectral_norm,r1_gamma", [("non_saturating", False, 1.0), ("hinge", True, 0.0)])
def test_each_step_updates_both_networks(loss, spectral_norm, r1_gamma):
    torch.manual_seed(0)
    model = GAN((2,), latent_dim=4, hidden=32, depth=2, loss=loss, spectral_norm=spectral_norm,
                r1_gamma=r1_gamma, lr_g=1e-2, lr_d=1e-2)
    assert model.automatic_optimization is False
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = L.Trainer(max_steps=2, limit_train_batches=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, GenerativeDataModule("8gaussians", batch_size=64))
    # One batch = one discriminator step + one generator step, both counted by Lightning.
    assert trainer.global_step == 2
    # Every weight matrix of both networks moved. (Biases may legitimately not: under the hinge
    # loss the last bias's gradients from real and fake examples cancel inside the margin.)
    weights = [name for name, value in model.named_parameters() if value.ndim >= 2]
    assert any(n.startswith("generator.") for n in weights) and any(n.startswith("discriminator.") for n in weights)
    for name in weights:
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before[name]), f"{name} not updated"
    for key in ("train/loss", "train/g_loss", "train/d_loss"):
        assert key in trainer.callback_metrics


def test_generator_step_leaves_the_discriminator_alone():
    """The generator's optimiser owns only the generator: a G step moves no discriminator weight."""
    model = GAN((2,), latent_dim=4, hidden=16, depth=1)
    opt_d, opt_g = model.configure_optimizers()
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == {id(p) for p in model.generator.parameters()}
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == {
        id(p) for p in model.discriminator.parameters()}


@pytest.mark.parametrize("config", ["experiments/toy2d/gan.yaml", "experiments/digits/gan.yaml"])
def test_gan_fits_from_config_and_samples(config, tmp_path, tiny_fit):
    cli = tiny_fit(config, tmp_path)
    model, dm = cli.model, cli.datamodule
    assert cli.trainer.global_step == 4  # two batches, two optimiser steps each
    assert list(tmp_path.rglob("samples/*.png")), "the sample-grid callback wrote no picture"
    assert "val/loss" in cli.trainer.callback_metrics
    samples = model.eval().sample(16)
    assert samples.shape == (16, *dm.data_shape) and torch.isfinite(samples).all()
    assert model.last_sample_nfe == 1
    if dm.is_discrete:  # tanh output: model space [-1, 1]
        assert samples.min() >= -1 and samples.max() <= 1
    with pytest.raises(NotImplementedError, match="likelihood='none'"):
        model.log_prob(dm.split("val")[:4])


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="non_saturating"):
        GAN((2,), loss="wasserstein")
    with pytest.raises(ValueError, match="r1_gamma"):
        GAN((2,), r1_gamma=-1.0)
