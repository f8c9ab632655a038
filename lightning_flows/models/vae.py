"""Variational autoencoder: trained on the ELBO, scored with the importance-weighted bound (IWAE).

Model: ``z ~ N(0, I)``, ``x | z ~ p_theta(x | z)`` with ``x`` in *model space*, and encoder
``q_phi(z | x) = N(m(x), diag s(x)^2)``. The decoder ``p_theta(x | z)`` (option ``decoder``) is always
a proper density of the data in model space, so ``-log p(x)`` (or any lower bound of ``log p(x)``)
goes through ``dm.bits_per_dim`` exactly like a flow's NLL:

* ``gaussian``: ``N(mu_theta(z), diag sigma^2)`` on R^D; for dequantised images a continuous
  density whose bits/dim is the usual dequantisation bound.
* ``discretized_logistic``: one logistic per dimension discretised onto the data's ``L`` levels
  (PixelCNN++-style, edge cells open), ``P(k | z)``;
* ``categorical``: a free categorical over the ``L`` levels per dimension, ``P(k | z)``.

The two discrete decoders score the level ``k(x)`` of the dequantised ``x`` and report
``log P(k | z)`` as the piecewise-constant density ``log P(k | z) + D log(L / 2)``
(:func:`lightning_flows.data.quantisation.piecewise_constant_log_density`), so the bounds below
are bounds on ``log P(k)`` and ``dm.bits_per_dim`` gives ``-log2 P(k) / D``.

    ELBO(x)   = E_q[log p(x | z)] - KL(q(z | x) || N(0, I))                  <= log p(x)
    IWAE_K(x) = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)],  z_k ~ q(. | x)     (Burda et al. 2016)

``ELBO = IWAE_1 <= IWAE_K <= IWAE_{K+1} <= log p(x)`` in expectation, and ``IWAE_K -> log p(x)``
as ``K -> inf``. Training minimises ``-ELBO``; ``log_prob`` returns ``IWAE_K`` (``iwae_k``).

Conditional VAE (``num_classes = C > 0``, issue 14; Sohn et al. 2015): the label's one-hot vector enters
the encoder ``q(z | x, y)`` (the MLP's input, or ``C`` constant extra input channels of the conv encoder)
and the decoder ``p(x | z, y)`` (concatenated to ``z``); the prior stays ``N(0, I)``. Every bound above
then holds given ``y``: training maximises ``ELBO(x | y)`` and ``log_prob(x, y) = IWAE_K(x | y)``. Without
labels a conditional model reports the marginal under the uniform class prior,

    log p(x) >= logsumexp_y [IWAE_K(x | y) + log p(y)]  (in expectation),

which is itself an importance-weighted bound: the log of an unbiased estimate of ``p(x)`` from ``K``
samples per class (``C K`` decoder passes).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from lightning_flows.conditioning import (check_labels, check_no_guidance, check_num_classes, marginalise_classes,
                                         one_hot, require_labels, sampling_labels)
from lightning_flows.data.quantisation import bin_centre, bin_index, dequantise, piecewise_constant_log_density
from lightning_flows.models.base import GenerativeModel
from lightning_flows.models.discretized import categorical_log_prob, discretized_logistic_log_prob
from lightning_flows.nn.dcgan import ConvDecoder, ConvEncoder, make_mlp, require_image_shape

DecoderScale = Literal["global", "per_dim", "predicted"]
Decoder = Literal["gaussian", "discretized_logistic", "categorical"]
DECODERS = ("gaussian", "discretized_logistic", "categorical")
LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise ``log N(x; mean, exp(log_scale)^2)`` (broadcasting)."""
    return -0.5 * (((x - mean) * torch.exp(-log_scale)) ** 2 + LOG_2PI) - log_scale


def kl_to_standard_normal(mean: Tensor, log_scale: Tensor) -> Tensor:
    """``KL(N(mean, diag exp(log_scale)^2) || N(0, I))`` summed over the last dim: ``(B, Z)`` -> ``(B,)``."""
    return 0.5 * (mean.pow(2) + torch.exp(2 * log_scale) - 1.0 - 2 * log_scale).sum(-1)


class VAE(GenerativeModel):
    """Gaussian-latent VAE with a Gaussian, discretised-logistic or categorical decoder in model space.

    Args:
        data_levels: the data's quantisation levels ``L``; linked from the DataModule (``dm.levels``)
            by the CLI and saved in checkpoints, never written in a config. Needed by the discrete
            decoders; ``None`` for continuous data.
        latent_dim: size of ``z``.
        network: ``auto`` (conv for images, MLP for vectors), ``conv`` or ``mlp``.
        hidden, depth, activation: MLP width, hidden layers (``depth=0``: linear maps) and activation.
        base_channels: conv width at full resolution (doubles per halving).
        decoder: ``gaussian``, ``discretized_logistic`` or ``categorical`` (see the module docstring).
        decoder_scale: the Gaussian's or logistic's scale: one learned scalar (``global``), one
            learned value per data dimension (``per_dim``) or output by the decoder (``predicted``).
            Unused by ``categorical``.
        min_log_scale: floor on the decoder log-scale; keeps the density finite on near-constant pixels.
        iwae_k: importance samples ``K`` used by ``log_prob``; ``iwae_chunk``: samples per forward pass.
        sample_mode: ``mean`` returns the decoder's mean image (sharp grids: ``mu_theta(z)``, clipped
            to [-1, 1] for the logistic, the expected cell centre for the categorical); ``sample``
            returns a true draw from ``p(x)`` (for a discrete decoder a level, dequantised uniformly).
        num_classes: classes ``C`` of a conditional VAE (0: unconditional); linked from the DataModule by the
            CLI (``data.conditional: true``), never written in a config.
    """

    likelihood = "bound"
    objective = "ELBO (variational)"

    def __init__(self, data_shape: Sequence[int] = (2,), data_levels: int | None = None, latent_dim: int = 16,
                 network: str = "auto", hidden: int = 256, depth: int = 2, activation: str = "silu",
                 base_channels: int = 32, decoder: Decoder = "gaussian", decoder_scale: DecoderScale = "per_dim",
                 min_log_scale: float = -7.0, iwae_k: int = 64, iwae_chunk: int = 16,
                 sample_mode: Literal["mean", "sample"] = "mean", lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0, num_classes: int = 0):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got '{decoder}'.")
        if network == "conv":  # the architecture error first: on vector data `network: mlp` comes before the decoder
            require_image_shape("ConvEncoder", self.data_shape)
        if decoder != "gaussian" and (data_levels is None or data_levels < 2):
            raise ValueError(f"decoder='{decoder}' models the data's quantisation levels, but data_levels="
                             f"{data_levels}. The CLI links it from the DataModule; continuous data (toy2d) has "
                             f"no levels: use decoder: gaussian there, or pass data_levels=dm.levels.")
        if decoder_scale not in ("global", "per_dim", "predicted"):
            raise ValueError(f"decoder_scale must be 'global', 'per_dim' or 'predicted', got '{decoder_scale}'.")
        if sample_mode not in ("mean", "sample"):
            raise ValueError(f"sample_mode must be 'mean' or 'sample', got '{sample_mode}'.")
        if iwae_k < 1 or iwae_chunk < 1:
            raise ValueError(f"iwae_k and iwae_chunk must be >= 1, got {iwae_k} and {iwae_chunk}.")
        if network == "auto":
            network = "conv" if len(self.data_shape) == 3 else "mlp"
        if network not in ("conv", "mlp"):
            raise ValueError(f"network must be 'auto', 'conv' or 'mlp', got '{network}'.")
        self.data_levels, self.decoder_kind = data_levels, decoder
        self.latent_dim, self.decoder_scale, self.min_log_scale = latent_dim, decoder_scale, min_log_scale
        self.iwae_k, self.iwae_chunk, self.sample_mode = iwae_k, iwae_chunk, sample_mode
        self.num_classes = classes = check_num_classes(num_classes)
        # Decoder outputs per data dimension: L logits (categorical), or a location plus, when
        # `predicted`, a log-scale.
        if decoder == "categorical":
            self.out_per_dim = data_levels
        else:
            self.out_per_dim = 2 if decoder_scale == "predicted" else 1
        # A conditional model's networks take the label's one-hot vector as extra inputs (C of them).
        if network == "conv":
            c, h, w = self.data_shape
            self.encoder = ConvEncoder((c + classes, h, w), 2 * latent_dim, base_channels=base_channels)
            self.decoder = ConvDecoder(latent_dim + classes, self.data_shape, base_channels=base_channels,
                                       out_channels=self.out_per_dim * self.data_shape[0])
        else:
            self.encoder = make_mlp(self.dim + classes, 2 * latent_dim, hidden, depth, activation)
            self.decoder = make_mlp(latent_dim + classes, self.out_per_dim * self.dim, hidden, depth, activation)
        scale_shape = {"global": (1,), "per_dim": self.data_shape, "predicted": None}[decoder_scale]
        has_scale_parameter = scale_shape is not None and decoder != "categorical"
        self.decoder_log_scale = nn.Parameter(torch.zeros(scale_shape)) if has_scale_parameter else None

    # ---- the two conditionals ----
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x: (B, *data_shape)`` (and labels ``y: (B,)`` when conditional) -> mean and log-std of
        ``q(z | x[, y])``, each ``(B, latent_dim)``."""
        if isinstance(self.encoder, ConvEncoder):
            if y is not None:  # the one-hot label as C constant extra channels
                x = torch.cat([x, one_hot(y, self.num_classes, x)[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
            h = self.encoder(x)
        else:
            h = self.encoder(self._with_label(x.reshape(x.shape[0], -1), y))
        mean, log_scale = h.chunk(2, dim=-1)
        return mean, log_scale

    def _with_label(self, h: Tensor, y: Tensor | None) -> Tensor:
        """``h: (N, F)`` -> ``(N, F + C)`` with the one-hot labels appended (unchanged when ``y`` is None)."""
        return h if y is None else torch.cat([h, one_hot(y, self.num_classes, h)], dim=-1)

    def _decoder_outputs(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """``z: (N, latent_dim)`` -> ``(N, out_per_dim, *data_shape)`` (a conv decoder's ``out_per_dim * C``
        channels are ``out_per_dim`` groups of ``C``)."""
        return self.decoder(self._with_label(z, y)).reshape(z.shape[0], self.out_per_dim, *self.data_shape)

    def decode(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``z: (N, latent_dim)`` (and labels ``y: (N,)`` when conditional) -> the parameters of ``p(x | z[, y])``:
        location and log-scale (each ``(N, *data_shape)``, the log-scale broadcastable to it) for ``gaussian``
        and ``discretized_logistic``; logits ``(N, *data_shape, L)`` and ``None`` for ``categorical``."""
        h = self._decoder_outputs(z, y)
        if self.decoder_kind == "categorical":
            return h.movedim(1, -1), None
        mean = h[:, 0]
        log_scale = h[:, 1] if self.decoder_scale == "predicted" else self.decoder_log_scale
        return mean, log_scale.clamp_min(self.min_log_scale)

    def decoder_log_prob(self, x: Tensor, z: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x | z[, y])`` in nats, a model-space density, ``x: (N, *data_shape)``, ``z: (N, latent_dim)``
        -> ``(N,)``; a discrete decoder's ``log P(k(x) | z)`` as its piecewise-constant density."""
        params, log_scale = self.decode(z, y)
        if self.decoder_kind == "gaussian":
            return gaussian_log_density(x, params, log_scale).flatten(1).sum(-1)
        k = bin_index(x, self.data_levels)
        if self.decoder_kind == "categorical":
            log_p_levels = categorical_log_prob(params, k)
        else:
            log_p_levels = discretized_logistic_log_prob(k, params, log_scale, self.data_levels)
        return piecewise_constant_log_density(log_p_levels.flatten(1).sum(-1), self.dim, self.data_levels)

    # ---- the bounds ----
    def elbo(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """One-sample reparameterised ELBO with the KL in closed form: ``(B, *data_shape)`` -> ``(B,)`` nats;
        a bound on ``log p(x | y)`` given labels ``y: (B,)`` (conditional models)."""
        mean, log_scale = self.encode(x, y)
        z = mean + torch.exp(log_scale) * torch.randn_like(mean)
        return self.decoder_log_prob(x, z, y) - kl_to_standard_normal(mean, log_scale)

    def iwae_bound(self, x: Tensor, k: int | None = None, y: Tensor | None = None) -> Tensor:
        """Importance-weighted bound ``IWAE_K``: ``(B, *data_shape)`` -> ``(B,)`` nats; ``K=1`` is the ELBO
        estimated without the closed-form KL. Given labels ``y: (B,)``, a bound on ``log p(x | y)``."""
        k = k or self.iwae_k
        mean, log_scale = self.encode(x, y)
        log_weights = []
        for start in range(0, k, self.iwae_chunk):
            kc = min(self.iwae_chunk, k - start)
            eps = torch.randn(kc, *mean.shape, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(log_scale) * eps  # (kc, B, Z)
            log_q = gaussian_log_density(z, mean, log_scale).sum(-1)
            log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
            x_rep = x.unsqueeze(0).expand(kc, *x.shape).reshape(kc * x.shape[0], *x.shape[1:])
            y_rep = None if y is None else y.repeat(kc)  # the same (sample, example) order as x_rep
            log_lik = self.decoder_log_prob(x_rep, z.reshape(-1, self.latent_dim), y_rep).reshape(kc, x.shape[0])
            log_weights.append(log_lik + log_prior - log_q)
        return torch.logsumexp(torch.cat(log_weights, 0), dim=0) - math.log(k)

    # ---- the interface ----
    def training_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``-ELBO`` in nats per example (model space), averaged over the batch; given ``y`` when conditional."""
        y = require_labels(type(self).__name__, self.num_classes, y, x.shape[0])
        return -self.elbo(x, y).mean()

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``IWAE_K`` with ``K = iwae_k``, ``(B,)`` nats: a stochastic lower bound on ``log p(x | y)`` given labels
        ``y: (B,)``, else on ``log p(x)`` (a conditional model's: the marginal over classes, module docstring)."""
        self._check_input(x)
        if y is not None:
            return self.iwae_bound(x, self.iwae_k, check_labels(type(self).__name__, self.num_classes, y, x.shape[0]))
        if not self.num_classes:
            return self.iwae_bound(x, self.iwae_k)
        per_class = [self.iwae_bound(x, self.iwae_k, torch.full((x.shape[0],), c, device=x.device))
                     for c in range(self.num_classes)]
        return marginalise_classes(torch.stack(per_class, dim=1))

    def likelihood_traits(self) -> dict:
        """What ``log_prob`` is, for the evaluator's labels (:mod:`lightning_flows.evaluation.likelihood_labels`):
        an IWAE bound whose exponential is an unbiased estimate of ``p(x)``, on the levels themselves with a
        discrete decoder."""
        return {"bound": {"name": f"ELBO / IWAE-{self.iwae_k} bound", "value": "bound",
                          "on_levels": self.decoder_kind != "gaussian", "unbiased_density": True}}

    @contextmanager
    def sampling_mode(self, mode: str) -> Iterator[None]:
        """``sample`` draws with ``mode`` (``mean`` or ``sample``) inside the block: the evaluator scores a VAE
        that shows decoder means on true draws ``x ~ p(x)`` as well."""
        if mode not in ("mean", "sample"):
            raise ValueError(f"sample_mode must be 'mean' or 'sample', got '{mode}'.")
        before, self.sample_mode = self.sample_mode, mode
        try:
            yield
        finally:
            self.sample_mode = before

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """``n`` samples ``(n, *data_shape)``; ``y: (n,)`` requested classes (conditional models; uniform draws
        when None). ``guidance`` must be 1.0: the VAE has no classifier-free guidance."""
        check_no_guidance(type(self).__name__, guidance)
        y = sampling_labels(type(self).__name__, self.num_classes, y, n, self.device)
        z = torch.randn(n, self.latent_dim, device=self.device)
        params, log_scale = self.decode(z, y)
        self.last_sample_nfe = 1
        if self.decoder_kind == "gaussian":
            return params if self.sample_mode == "mean" else params + torch.exp(log_scale) * torch.randn_like(params)
        levels = self.data_levels
        if self.decoder_kind == "categorical":
            if self.sample_mode == "mean":  # expected cell centre
                centres = bin_centre(torch.arange(levels, device=params.device), levels, params.dtype)
                return torch.softmax(params, -1) @ centres
            k = torch.distributions.Categorical(logits=params).sample()
        else:
            if self.sample_mode == "mean":
                return params.clamp(-1, 1)
            u = torch.rand_like(params).clamp(1e-6, 1 - 1e-6)
            k = bin_index(params + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u)), levels)
        return dequantise(k, torch.rand(k.shape, device=k.device, dtype=params.dtype), levels)
