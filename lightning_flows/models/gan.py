"""Generative adversarial network with Lightning 2 manual optimisation.

Generator ``G: z -> x`` (``z ~ N(0, I)``), discriminator ``D: x -> logit``. Each training batch
takes one discriminator step, then one generator step, each with its own Adam optimiser
(``self.optimizers()`` returns both; the removed ``optimizer_idx`` API is not used).

Losses (``loss``):
    non_saturating   L_D = softplus(-D(x)) + softplus(D(G(z))),   L_G = softplus(-D(G(z)))
    hinge            L_D = relu(1 - D(x)) + relu(1 + D(G(z))),    L_G = -D(G(z))
Optional R1 penalty (Mescheder et al. 2018) adds ``r1_gamma / 2 * E ||grad_x D(x)||^2`` on real
data to ``L_D``; optional spectral norm wraps every discriminator layer.

A GAN has no likelihood (``likelihood = "none"``). ``val/loss`` and ``test/loss`` are the
discriminator's loss on held-out data against fresh samples (without R1): near ``2 log 2`` for the
non-saturating loss when the discriminator cannot tell them apart.

Note: Lightning counts every optimiser step in ``trainer.global_step``, so one GAN batch advances
it by 2 and ``max_steps`` is twice the number of batches.

Under DDP (``--trainer.strategy ddp``) DDP's reducer expects *every* parameter to receive a gradient
in *every* backward pass. The generator step's loss ``L_G = f(D(G(z)))`` already reaches both
networks; the discriminator step's loss reaches the generator too when it is *not* detached from
``G(z)``, so under DDP it is not: the generator's gradients of ``L_D`` are all-reduced like any
other and then discarded (``opt_g.zero_grad`` runs before the generator's own backward), and no
weight moves differently. The price is one extra backward pass through ``G`` per batch, paid only
when the module is wrapped by DDP; the alternative, ``find_unused_parameters=True``, would have to
be chosen by the user in the strategy and traverses the graph after every backward instead.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_flows.models.base import GenerativeModel
from lightning_flows.nn.dcgan import ConvDecoder, ConvEncoder, make_mlp

LOSSES = ("non_saturating", "hinge")


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, loss: str) -> Tensor:
    """Scalar ``L_D`` from logits on real ``(B,)`` and generated ``(B,)`` examples."""
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor, loss: str) -> Tensor:
    """Scalar ``L_G`` from the discriminator's logits on generated examples ``(B,)``."""
    if loss == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: nn.Module, real: Tensor) -> Tensor:
    """``E ||grad_x D(x)||^2`` on real data (differentiable w.r.t. the discriminator's weights)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(-1).mean()


class GAN(GenerativeModel):
    """DCGAN-style GAN for images, MLP GAN for vectors.

    Args:
        latent_dim: size of ``z``.
        network: ``auto`` (conv for images, MLP for vectors), ``conv`` or ``mlp``.
        hidden, depth, activation: MLP width, hidden layers and activation (both networks).
        base_channels: conv width at full resolution.
        generator_norm: ``batch`` (DCGAN) or ``none`` in the conv generator.
        loss: ``non_saturating`` or ``hinge``.
        spectral_norm: spectral normalisation on every discriminator layer.
        r1_gamma: weight of the R1 penalty (0 turns it off).
        lr_g, lr_d: Adam learning rates; ``betas``: Adam betas (DCGAN's ``(0.5, 0.999)``).
    """

    likelihood = "none"
    objective = "Adversarial loss"
    optimizer_steps_per_batch = 2  # one discriminator and one generator step

    def __init__(self, data_shape: Sequence[int] = (2,), latent_dim: int = 32, network: str = "auto",
                 hidden: int = 256, depth: int = 3, activation: str = "silu", base_channels: int = 32,
                 generator_norm: str = "batch", loss: Literal["non_saturating", "hinge"] = "non_saturating",
                 spectral_norm: bool = False, r1_gamma: float = 0.0, lr_g: float = 2e-4, lr_d: float = 2e-4,
                 betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 0.0):
        super().__init__(data_shape, lr_g, weight_decay)
        self.save_hyperparameters()
        self.automatic_optimization = False
        if loss not in LOSSES:
            raise ValueError(f"Unknown GAN loss '{loss}'. Choose one of: {', '.join(LOSSES)}.")
        if r1_gamma < 0:
            raise ValueError(f"r1_gamma must be >= 0, got {r1_gamma}.")
        if network == "auto":
            network = "conv" if len(self.data_shape) == 3 else "mlp"
        if network not in ("conv", "mlp"):
            raise ValueError(f"network must be 'auto', 'conv' or 'mlp', got '{network}'.")
        self.latent_dim, self.loss_kind, self.r1_gamma = latent_dim, loss, r1_gamma
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, tuple(betas)
        if network == "conv":
            # tanh: the generator's images live in model space [-1, 1] like the data.
            self.generator = nn.Sequential(
                ConvDecoder(latent_dim, self.data_shape, base_channels=base_channels, norm=generator_norm),
                nn.Tanh())
            self.discriminator = ConvEncoder(self.data_shape, 1, base_channels=base_channels,
                                             spectral_norm=spectral_norm)
        else:
            self.generator = _Unflatten(make_mlp(latent_dim, self.dim, hidden, depth, activation), self.data_shape)
            self.discriminator = nn.Sequential(nn.Flatten(1), make_mlp(self.dim, 1, hidden, depth, activation,
                                                                       spectral_norm=spectral_norm))

    def forward(self, z: Tensor) -> Tensor:
        """``G(z)``: ``(B, latent_dim)`` -> ``(B, *data_shape)``."""
        return self.generator(z)

    def critic(self, x: Tensor) -> Tensor:
        """``D(x)``: ``(B, *data_shape)`` -> logits ``(B,)``."""
        return self.discriminator(x).reshape(-1)

    def _noise(self, n: int, like: Tensor) -> Tensor:
        return torch.randn(n, self.latent_dim, device=like.device, dtype=like.dtype)

    # ---- evaluation objective (val/test through the base class) ----
    def training_loss(self, x: Tensor) -> Tensor:
        """The discriminator's loss on ``x`` against as many fresh samples (no R1); used for val/test."""
        return discriminator_loss(self.critic(x), self.critic(self(self._noise(x.shape[0], x))), self.loss_kind)

    # ---- training: one D step, one G step ----
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self._check_input(batch)
        opt_d, opt_g = self.optimizers()
        n = batch.shape[0]

        fake = self(self._noise(n, batch))
        if not self._wrapped_by_ddp():
            fake = fake.detach()  # nothing needs the generator's gradient of L_D (see the module docstring)
        d_loss = discriminator_loss(self.critic(batch), self.critic(fake), self.loss_kind)
        if self.r1_gamma > 0:
            d_total = d_loss + 0.5 * self.r1_gamma * r1_penalty(self.discriminator, batch)
        else:
            d_total = d_loss
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_total)
        opt_d.step()

        # Only the generator's optimiser steps here; the discriminator's gradients from this
        # backward are cleared by its own zero_grad at the next batch.
        g_loss = generator_loss(self.critic(self(self._noise(n, batch))), self.loss_kind)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()

        self.log_dict({"train/loss": g_loss, "train/g_loss": g_loss, "train/d_loss": d_loss},
                      prog_bar=True, batch_size=n)
        return g_loss

    def _wrapped_by_ddp(self) -> bool:
        """True when DDP's reducer wraps this module and so wants a gradient for every parameter."""
        return self._trainer is not None and isinstance(self.trainer.model, DistributedDataParallel)

    def configure_optimizers(self):
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr_d, betas=self.betas,
                                 weight_decay=self.weight_decay)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.lr_g, betas=self.betas,
                                 weight_decay=self.weight_decay)
        return opt_d, opt_g

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        self.last_sample_nfe = 1
        return self(torch.randn(n, self.latent_dim, device=self.device))


class _Unflatten(nn.Module):
    """Reshape a ``(B, D)`` network output to ``(B, *shape)``."""

    def __init__(self, net: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.net, self.shape = net, tuple(shape)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).reshape(z.shape[0], *self.shape)
