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

Class-conditional GAN (``num_classes = C > 0``, issue 14): the generator ``G(z, y)`` takes the label's one-hot
vector concatenated to ``z`` (MLP and conv generators alike); the discriminator is a projection discriminator
(Miyato & Koyama 2018), ``D(x, y) = psi(phi(x)) + <embed(y), phi(x)>``, with ``phi`` the discriminator's
features (everything but its last linear layer), ``psi`` that layer and ``embed`` a learned class embedding
(spectrally normalised with the rest when ``spectral_norm``). Fakes are drawn for the batch's own labels in
both steps, so generated classes follow the data's class frequencies; R1 is taken on ``x -> D(x, y)``.

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

from functools import partial
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from lightning_flows.conditioning import (check_no_guidance, check_num_classes, one_hot, require_labels,
                                         sampling_labels)
from lightning_flows.models.base import GenerativeModel, split_batch
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


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """``E ||grad_x D(x)||^2`` on real data (differentiable w.r.t. the discriminator's weights); ``discriminator``
    maps ``(B, *data_shape)`` to logits (a conditional one with the labels bound)."""
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
        lr_schedule, warmup_steps: the shared schedule (:class:`GenerativeModel`), applied to both
            optimizers as a factor on ``lr_g`` and ``lr_d``; each advances once per batch.
        num_classes: classes ``C`` of a class-conditional GAN (0: unconditional); linked from the DataModule by
            the CLI (``data.conditional: true``), never written in a config.
    """

    likelihood = "none"
    objective = "Adversarial loss"
    optimizer_steps_per_batch = 2  # one discriminator and one generator step

    def __init__(self, data_shape: Sequence[int] = (2,), latent_dim: int = 32, network: str = "auto",
                 hidden: int = 256, depth: int = 3, activation: str = "silu", base_channels: int = 32,
                 generator_norm: str = "batch", loss: Literal["non_saturating", "hinge"] = "non_saturating",
                 spectral_norm: bool = False, r1_gamma: float = 0.0, lr_g: float = 2e-4, lr_d: float = 2e-4,
                 betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_steps: int = 0, num_classes: int = 0):
        super().__init__(data_shape, lr_g, weight_decay, lr_schedule, warmup_steps)
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
        self.num_classes = classes = check_num_classes(num_classes)
        g_inputs = latent_dim + classes  # a conditional generator reads [z, onehot(y)]
        if network == "conv":
            # tanh: the generator's images live in model space [-1, 1] like the data.
            self.generator = nn.Sequential(
                ConvDecoder(g_inputs, self.data_shape, base_channels=base_channels, norm=generator_norm),
                nn.Tanh())
            self.discriminator = ConvEncoder(self.data_shape, 1, base_channels=base_channels,
                                             spectral_norm=spectral_norm)
            feature_dim = self.discriminator.flat_features
        else:
            self.generator = _Unflatten(make_mlp(g_inputs, self.dim, hidden, depth, activation), self.data_shape)
            self.discriminator = nn.Sequential(nn.Flatten(1), make_mlp(self.dim, 1, hidden, depth, activation,
                                                                       spectral_norm=spectral_norm))
            feature_dim = hidden if depth > 0 else self.dim
        if classes:
            # The projection discriminator's class embedding, one row per class in phi(x)'s space
            # (Xavier-initialised as in Miyato & Koyama's code).
            embedding = nn.Embedding(classes, feature_dim)
            nn.init.xavier_uniform_(embedding.weight)
            self.class_projection = _spectral_norm(embedding) if spectral_norm else embedding

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """``G(z)``, or ``G(z, y)`` for labels ``y: (B,)`` when conditional: ``(B, latent_dim)`` ->
        ``(B, *data_shape)``."""
        return self.generator(z if y is None else torch.cat([z, one_hot(y, self.num_classes, z)], dim=-1))

    def critic(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``D(x)``: ``(B, *data_shape)`` -> logits ``(B,)``; a conditional model's projection discriminator
        ``D(x, y) = psi(phi(x)) + <embed(y), phi(x)>`` for labels ``y: (B,)``."""
        if y is None:
            return self.discriminator(x).reshape(-1)
        features = self.discriminator_features(x)
        return self._discriminator_head(features).reshape(-1) + self.class_projection(y).mul(features).sum(-1)

    def discriminator_features(self, x: Tensor) -> Tensor:
        """``phi(x)``: the discriminator's input to its last linear layer, ``(B, *data_shape)`` -> ``(B, F)``."""
        if isinstance(self.discriminator, ConvEncoder):
            return self.discriminator.features(x).flatten(1)
        flatten, mlp = self.discriminator
        return mlp[:-1](flatten(x))

    def _discriminator_head(self, features: Tensor) -> Tensor:
        """``psi``: the discriminator's last linear layer, ``(B, F)`` -> ``(B, 1)``."""
        return self.discriminator.head(features) if isinstance(self.discriminator, ConvEncoder) \
            else self.discriminator[1][-1](features)

    def _noise(self, n: int, like: Tensor) -> Tensor:
        return torch.randn(n, self.latent_dim, device=like.device, dtype=like.dtype)

    # ---- evaluation objective (val/test through the base class) ----
    def training_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The discriminator's loss on ``x`` (labels ``y`` when conditional) against as many fresh samples of the
        same classes (no R1); used for val/test."""
        y = require_labels(type(self).__name__, self.num_classes, y, x.shape[0])
        fake = self(self._noise(x.shape[0], x), y)
        return discriminator_loss(self.critic(x, y), self.critic(fake, y), self.loss_kind)

    # ---- training: one D step, one G step ----
    def training_step(self, batch: Tensor | tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        batch, y = split_batch(batch)
        self._check_input(batch)
        y = require_labels(type(self).__name__, self.num_classes, y, batch.shape[0])
        opt_d, opt_g = self.optimizers()
        n = batch.shape[0]

        fake = self(self._noise(n, batch), y)
        if not self._wrapped_by_ddp():
            fake = fake.detach()  # nothing needs the generator's gradient of L_D (see the module docstring)
        d_loss = discriminator_loss(self.critic(batch, y), self.critic(fake, y), self.loss_kind)
        if self.r1_gamma > 0:
            critic = self.discriminator if y is None else partial(self.critic, y=y)
            d_total = d_loss + 0.5 * self.r1_gamma * r1_penalty(critic, batch)
        else:
            d_total = d_loss
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_total)
        opt_d.step()

        # Only the generator's optimiser steps here; the discriminator's gradients from this
        # backward are cleared by its own zero_grad at the next batch.
        g_loss = generator_loss(self.critic(self(self._noise(n, batch), y), y), self.loss_kind)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.step_lr_schedulers()  # manual optimisation: Lightning leaves the schedules to us

        self.log_dict({"train/loss": g_loss, "train/g_loss": g_loss, "train/d_loss": d_loss},
                      prog_bar=True, batch_size=n)
        return g_loss

    def _wrapped_by_ddp(self) -> bool:
        """True when DDP's reducer wraps this module and so wants a gradient for every parameter."""
        return self._trainer is not None and isinstance(self.trainer.model, DistributedDataParallel)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The discriminator's weights: its network and, when conditional, the projection's class embedding."""
        projection = list(self.class_projection.parameters()) if self.num_classes else []
        return [*self.discriminator.parameters(), *projection]

    def configure_optimizers(self):
        opt_d = torch.optim.Adam(self.discriminator_parameters(), lr=self.lr_d, betas=self.betas,
                                 weight_decay=self.weight_decay)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.lr_g, betas=self.betas,
                                 weight_decay=self.weight_decay)
        return self.scheduled(opt_d, opt_g)  # the recipe's schedule, applied to both

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """``n`` samples ``(n, *data_shape)``; ``y: (n,)`` requested classes (conditional models; uniform draws
        when None). ``guidance`` must be 1.0: the GAN has no classifier-free guidance."""
        check_no_guidance(type(self).__name__, guidance)
        y = sampling_labels(type(self).__name__, self.num_classes, y, n, self.device)
        self.last_sample_nfe = 1
        return self(torch.randn(n, self.latent_dim, device=self.device), y)


class _Unflatten(nn.Module):
    """Reshape a ``(B, D)`` network output to ``(B, *shape)``."""

    def __init__(self, net: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.net, self.shape = net, tuple(shape)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).reshape(z.shape[0], *self.shape)
