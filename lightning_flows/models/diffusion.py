"""DDPM (Ho et al. 2020) with epsilon-prediction, ancestral and DDIM sampling, and its variational bound.

Discrete time ``t = 1..T``, ``alpha_t = 1 - beta_t``, ``alpha_bar_t = prod_{s <= t} alpha_s``
(``alpha_bar_0 = 1``). Everything is in *model space*.

    forward    q(x_t | x_0)          = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    posterior  q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I),
               mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                       + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
               beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    reverse    p(x_{t-1} | x_t)      = N(mu~_t(x_t, x0_hat), sigma_t^2 I),
               x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)
    training   L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

The bound (``variational_bound``, the negative of ``log_prob(kind="bound")``) is DDPM's ``L`` in
**nats per example in model space**; it is an upper bound on ``-log p(x_0)``, never the exact NLL:

    L = KL(q(x_T | x_0) || N(0, I))                                      (L_T)
      + sum_{t=2}^T E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     (L_{t-1})
      - E_q log p(x_0 | x_1)                                              (L_0)

The decoder ``p(x_0 | x_1)`` is either ``N(x_0; x0_hat(x_1, 1), beta_1 I)``, a density on the dequantised
data, or (``decoder: discretized``) DDPM's eq. 13, the same Gaussian's mass on the level cell of ``x_0``
with the edge cells open, for a model that diffuses the data's levels. Both make ``dm.bits_per_dim(L)`` a
correct bits/dim bound for image data (the discrete one is ``-log2 P(k) / D``, via
:func:`lightning_flows.data.quantisation.piecewise_constant_log_density`).

The exact alternative, ``log_prob(kind="ode")``, is the probability-flow ODE's log-density
(see :class:`Diffusion`).

Class-conditional (``num_classes > 0``, linked from a ``conditional: true`` DataModule): the network is
``eps_theta(x_t, t, y)``, training drops labels to a learned null class with probability ``label_dropout``,
and both samplers (ancestral, DDIM) use the classifier-free guided noise prediction
``eps(x_t, t, null) + w (eps(x_t, t, y) - eps(x_t, t, null))`` (:mod:`lightning_flows.nn.class_conditioning`,
one network call per step on the doubled batch). ``log_prob(x, y)`` scores ``p(x | y)`` (bound or ODE) with the
conditional network (w = 1); ``log_prob(x)`` without labels scores the null-class (unconditional) network.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from lightning_flows.data.quantisation import bin_centre, bin_index, piecewise_constant_log_density
from lightning_flows.models.base import GenerativeModel
from lightning_flows.models.discretized import discretized_gaussian_log_prob
from lightning_flows.nn import broadcast_time, make_time_backbone
from lightning_flows.conditioning import check_labels, check_num_classes, require_labels, sampling_labels
from lightning_flows.nn.class_conditioning import drop_labels, guided
from lightning_flows.ode import DIVERGENCE_KINDS, SolverConfig, as_solver_config, ode_log_likelihood

LOG_2PI = math.log(2 * math.pi)
SCHEDULES = ("linear", "cosine")
DECODERS = ("gaussian", "discretized")
# likelihood_kind -> the label it carries in tables (the lecture's "Likelihood" column)
LIKELIHOOD_KINDS = {"bound": "bound", "ode": "exact"}


# ---------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------
def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule, rescaled by ``1000 / T`` so that any ``T`` noises as much as T=1000 does."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: ``alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)``, normalised."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def monotone_slopes(y: Tensor) -> Tensor:
    """Fritsch-Carlson (PCHIP) slopes of samples ``y: (N + 1,)`` on the grid ``i / N``: the derivatives
    at the nodes of the monotone, C^1 piecewise-cubic interpolant (scipy's ``PchipInterpolator``)."""
    h = 1.0 / (len(y) - 1)
    secants = (y[1:] - y[:-1]) / h
    slopes = torch.zeros_like(y)
    left, right = secants[:-1], secants[1:]
    same_sign = left * right > 0
    # Equal spacing: the harmonic mean of neighbouring secants, 0 at a local extremum.
    slopes[1:-1] = torch.where(same_sign, 2 / (1 / left.where(same_sign, 1.0) + 1 / right.where(same_sign, 1.0)),
                               torch.zeros_like(left))
    for end, (d0, d1) in ((0, (secants[0], secants[1])), (-1, (secants[-1], secants[-2]))):
        slope = (3 * d0 - d1) / 2  # the one-sided three-point estimate, kept shape-preserving
        if torch.sign(slope) != torch.sign(d0):
            slope = torch.zeros_like(slope)
        elif torch.sign(d0) != torch.sign(d1) and slope.abs() > 3 * d0.abs():
            slope = 3 * d0
        slopes[end] = slope
    return slopes


class NoiseSchedule(nn.Module):
    """The schedule's constants as buffers indexed by ``t = 0..T`` (entry 0: ``beta_0 = 0, alpha_bar_0 = 1``).

    All methods take integer timesteps ``t: (B,)`` and tensors ``x: (B, ...)``.
    """

    def __init__(self, betas: Tensor):
        super().__init__()
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1D tensor with every entry in (0, 1).")
        self.num_steps = len(betas)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas.double()])
        alpha_bars = torch.cumprod(1 - betas, 0)
        # Posterior variance; entry 1 is 0 (x_0 is known given x_1 and x_0) and never used as a density scale.
        posterior_var = torch.zeros_like(betas)
        posterior_var[1:] = betas[1:] * (1 - alpha_bars[:-1]) / (1 - alpha_bars[1:])
        for name, value in (("betas", betas), ("alpha_bars", alpha_bars), ("posterior_var", posterior_var)):
            self.register_buffer(name, value.float(), persistent=False)
        # Kept in float64: 1 - alpha_bar(t) at the first steps (~1e-5) is what the ODE's score divides by.
        log_alpha_bars = torch.log(alpha_bars)
        self.register_buffer("log_alpha_bars", log_alpha_bars, persistent=False)
        self.register_buffer("log_alpha_bar_slopes", monotone_slopes(log_alpha_bars), persistent=False)

    @staticmethod
    def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return values[t].reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def q_mean_std(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``sqrt(alpha_bar_t) x_0`` and std ``sqrt(1 - alpha_bar_t)`` of ``q(x_t | x_0)``."""
        ab = self._at(self.alpha_bars, t, x0)
        return ab.sqrt() * x0, (1 - ab).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        mean, std = self.q_mean_std(x0, t)
        return mean + std * noise

    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        ab = self._at(self.alpha_bars, t, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        ab = self._at(self.alpha_bars, t, xt)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    def posterior_mean(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """``mu~_t(x_t, x_0)`` of ``q(x_{t-1} | x_t, x_0)``."""
        beta, ab, ab_prev = (self._at(v, t, xt) for v in (self.betas, self.alpha_bars, self.alpha_bars_prev))
        return (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * xt) / (1 - ab)

    # ---- the continuous-time VP view of the same schedule (probability-flow ODE) ----
    def _hermite(self, t: Tensor) -> tuple[Tensor, ...]:
        """Step index ``i`` of ``t`` in [0, 1] and the position ``s`` in [0, 1] within that step (float64)."""
        scaled = t.double().clamp(0, 1) * self.num_steps
        i = scaled.floor().clamp(max=self.num_steps - 1).long()
        return i, scaled - i

    def continuous_log_alpha_bar(self, t: Tensor) -> Tensor:
        """``log alpha_bar(t)`` for continuous ``t`` in [0, 1]: the monotone cubic (PCHIP) through the
        discrete ``log alpha_bar_i`` at ``t = i / T``. Smooth (C^1) so that adaptive ODE solvers meet no
        kink at every step, and decreasing so that ``beta(t) >= 0``."""
        i, s = self._hermite(t)
        y, m, h = self.log_alpha_bars, self.log_alpha_bar_slopes, 1.0 / self.num_steps
        value = ((2 * s ** 3 - 3 * s ** 2 + 1) * y[i] + (s ** 3 - 2 * s ** 2 + s) * h * m[i]
                 + (3 * s ** 2 - 2 * s ** 3) * y[i + 1] + (s ** 3 - s ** 2) * h * m[i + 1])
        return value.to(t.dtype)

    def continuous_beta(self, t: Tensor) -> Tensor:
        """``beta(t) = -d log alpha_bar(t) / dt`` of the interpolation above."""
        i, s = self._hermite(t)
        y, m, h = self.log_alpha_bars, self.log_alpha_bar_slopes, 1.0 / self.num_steps
        slope = ((6 * s ** 2 - 6 * s) * (y[i] - y[i + 1]) / h + (3 * s ** 2 - 4 * s + 1) * m[i]
                 + (3 * s ** 2 - 2 * s) * m[i + 1])
        return (-slope).to(t.dtype)

    def continuous_sigma(self, t: Tensor) -> Tensor:
        """``sigma(t) = sqrt(1 - alpha_bar(t))``, the noise level of ``x_t``, accurate near ``t = 0``."""
        return torch.sqrt(-torch.expm1(self.continuous_log_alpha_bar(t.double()))).to(t.dtype)

    @property
    def alpha_bars_prev(self) -> Tensor:
        """``alpha_bar_{t-1}`` at index ``t`` (index 0 repeats ``alpha_bar_0 = 1``)."""
        return torch.cat([self.alpha_bars[:1], self.alpha_bars[:-1]])


def make_schedule(name: str, num_steps: int) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"Unknown noise schedule '{name}'. Choose one of: {', '.join(SCHEDULES)}.")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}.")
    return NoiseSchedule(linear_betas(num_steps) if name == "linear" else cosine_betas(num_steps))


def gaussian_kl(mean_q: Tensor, var_q: Tensor, mean_p: Tensor, var_p: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean_q, var_q) || N(mean_p, var_p))``."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def bound_timestep_sample(num_steps: int, k: int, batch: int, device=None) -> tuple[Tensor, Tensor]:
    """Timesteps ``t: (batch, k)`` in ``2..T`` and weights ``w: (k,)`` such that ``sum_j w_j L_{t_j - 1}``
    estimates the bound's ``T - 1`` KL terms without bias from ``k`` terms per example.

    The terms shrink like ``1/t`` from the first steps on and the first few carry much of the sum, so
    uniform draws leave a heavy tail (on digits with ``T = 1000``, 60 examples x 50 draws scattered over
    +-0.5 bits/dim). Here the first ``k // 2`` terms are taken exactly (weight 1) and the other draws are
    stratified over the remaining steps: one uniform draw in each of equal strata, weight = stratum width.
    ``k >= T - 1`` takes every term.
    """
    n_terms = num_steps - 1
    if k >= n_terms:
        return torch.arange(2, num_steps + 1, device=device).expand(batch, n_terms), torch.ones(n_terms, device=device)
    head, tail_k = k // 2, k - k // 2
    width = (n_terms - head) / tail_k
    u = (torch.arange(tail_k, device=device) + torch.rand(batch, tail_k, device=device, dtype=torch.float64)) * width
    tail = 2 + head + u.floor().long().clamp(max=n_terms - head - 1)
    t = torch.cat([torch.arange(2, 2 + head, device=device).expand(batch, head), tail], 1)
    weights = torch.cat([torch.ones(head, device=device), torch.full((tail_k,), width, device=device)])
    return t, weights


def ddim_timesteps(num_steps: int, sample_steps: int) -> list[int]:
    """``sample_steps`` increasing timesteps in ``1..T`` spread evenly, always including ``T``."""
    if not 1 <= sample_steps <= num_steps:
        raise ValueError(f"DDIM needs 1 <= sample_steps <= num_steps={num_steps}, got {sample_steps}.")
    steps = torch.linspace(num_steps, 1, sample_steps).round().long().unique().tolist()
    return sorted(steps)


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
class Diffusion(GenerativeModel):
    """DDPM with an epsilon-predicting network ``eps_theta(x_t, t / T)`` from the shared backbones.

    Two likelihoods, both in nats per example in model space (so both go through ``dm.bits_per_dim``):

    * ``bound``: DDPM's variational bound ``-L`` (:meth:`variational_bound`), a lower bound on ``log p(x)``.
      With ``decoder: discretized`` it is DDPM's published form: the model diffuses the data's levels
      and ``L_0`` is the discretised Gaussian of eq. 13, a bound on ``log P(k)`` reported as its
      piecewise-constant model-space density.
    * ``ode``: the **exact** log-density of the probability-flow ODE of the continuous-time VP view of
      this model (:meth:`log_prob_ode`), through the same :func:`lightning_flows.ode.ode_log_likelihood`
      that scores flow matching and the CNF. ``alpha_bar(t)`` interpolates the discrete schedule
      (``t = i / T`` is step ``i``), ``beta(t) = -d log alpha_bar / dt``, the score is
      ``-eps_theta(x, t) / sigma(t)`` and the field is ``dx/dt = -beta(t) / 2 (x - eps_theta(x, t) / sigma(t))``,
      integrated from the data at ``t = 1 / T`` (the first step the network was trained on) to ``N(0, I)``
      at ``t = 1``. ``likelihood_divergence: hutchinson`` estimates the same log-density without bias.

    ``log_prob(x)`` returns the configured ``likelihood_kind`` and ``log_prob(x, kind=...)`` the other;
    :attr:`likelihood` reads ``bound`` or ``exact`` accordingly, and :data:`LIKELIHOOD_KINDS` maps each
    kind to that label, so an evaluator can report both.

    Coarse levels: once ``sigma_t`` is far below a level cell's width, the levels are resolved and, for a
    model of the levels (``discretized``), ``eps`` becomes a sawtooth of ``x_t`` that a small network
    learns slowly; the bound's first KL terms (weighted ~1/t) then cost up to ``log(cell / sigma_1)``
    nats per dimension. On digits (17 levels, cells 0.12 wide; 1000 steps at batch 128, 60 test digits)
    ``discretized`` reaches 3.5 bits/dim with the cosine schedule at ``T = 1000`` (``sigma_1 = 0.006``)
    and 2.4 at ``T = 100``; the ``gaussian`` decoder on the dequantised data pays the same first steps but
    gets them back from its decoder's density and reaches 2.0 at ``T = 1000``. For 256 levels (cells
    0.008, about ``sigma_1``) DDPM's ``T = 1000`` with ``discretized`` is the published setting.

    Args:
        data_levels: the data's quantisation levels ``L``, linked from the DataModule by the CLI (and
            saved in checkpoints); needed by ``decoder: discretized``, ``None`` for continuous data.
        num_steps: ``T``.
        schedule: ``linear`` (DDPM) or ``cosine`` (improved DDPM).
        backbone, hidden, depth, activation, base_channels, channel_mults: the shared
            :func:`make_time_backbone` (UNet for images, MLP for vectors).
        decoder: ``L_0``'s decoder ``p(x_0 | x_1)``: ``gaussian`` (a density on the dequantised data,
            which the model then diffuses: ``x_0`` is the DataModule's dequantised example) or
            ``discretized`` (DDPM: ``x_0`` is the centre of the example's level cell, in training and in
            the bound, and ``L_0 = -log P(k | x_1)`` integrates ``N(mu_theta(x_1, 1), beta_1)`` over the
            cell, edge cells open).
        reverse_variance: ``sigma_t^2`` of ``p(x_{t-1} | x_t)``: ``beta`` (``beta_t``, DDPM's CIFAR-10
            choice) or ``posterior`` (``beta~_t``); used by ancestral sampling and by the bound. For
            data with a smooth density (dequantised images) ``beta`` gives the tighter bound: at small
            ``t`` the true reverse variance is close to ``beta_t``, and ``beta~_t`` (about ``beta_t / 2``
            at ``t = 2``) costs a KL of ~0.4 nats per dimension summed over the first steps.
        sampler: ``ancestral`` (``T`` network evaluations) or ``ddim`` (``sample_steps`` evaluations).
        sample_steps: DDIM steps; ``ddim_eta``: 0 for deterministic DDIM, 1 for DDPM-like noise.
        clip_denoised: clamp ``x0_hat`` to [-1, 1] in the reverse process (default: on for images, whose
            model space is [-1, 1]; off for vectors), for sampling and for the bound alike, so the bound
            scores the model that is sampled (DDPM's own bits/dim code clips too). Without it the last
            step of the cosine schedule (``beta_T = 0.999``, ``alpha_bar_T ~ 1e-9``) divides the noise
            prediction's error by ``sqrt(alpha_bar_T)``: one KL term of ~1 bit/dim on digits.
        bound_timesteps: ``None`` sums all ``T - 1`` KL terms of the bound; an integer ``k`` estimates
            their sum without bias from ``k`` terms per example (cheaper, noisier): the first ``k // 2``
            exactly, the rest stratified (:func:`bound_timestep_sample`).
        bound_chunk: timesteps evaluated per network call when computing the bound.
        likelihood_kind: what ``log_prob`` returns by default: ``bound`` or ``ode``.
        likelihood_solver: ODE solver of :meth:`log_prob_ode` (default dopri5, rtol = atol = 1e-5,
            at most 10,000 evaluations: ``max_nfe``).
        likelihood_divergence: ``exact`` trace or ``hutchinson`` (unbiased, one backward pass).
        num_classes: classes of the labels (linked from a ``conditional: true`` DataModule); 0 = unconditional.
        label_dropout: probability that a training label is replaced by the null class (classifier-free
            guidance needs the unconditional branch it trains); used when ``num_classes > 0``.
    """

    likelihood = "bound"
    objective = "Score matching (denoising)"
    LIKELIHOOD_KINDS = LIKELIHOOD_KINDS

    def __init__(self, data_shape: Sequence[int] = (2,), data_levels: int | None = None, num_steps: int = 1000,
                 schedule: Literal["linear", "cosine"] = "linear", backbone: str = "auto", hidden: int = 256,
                 depth: int = 3, activation: str = "silu", base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), decoder: Literal["gaussian", "discretized"] = "gaussian",
                 reverse_variance: Literal["posterior", "beta"] = "beta",
                 sampler: Literal["ancestral", "ddim"] = "ancestral", sample_steps: int = 50,
                 ddim_eta: float = 0.0, clip_denoised: bool | None = None, bound_timesteps: int | None = None,
                 bound_chunk: int = 8, likelihood_kind: Literal["bound", "ode"] = "bound",
                 likelihood_solver: SolverConfig | dict | None = None, likelihood_divergence: str = "exact",
                 lr: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant", warmup_steps: int = 0,
                 num_classes: int = 0, label_dropout: float = 0.1):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        num_classes = check_num_classes(num_classes)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}.")
        self.num_classes, self.label_dropout = num_classes, label_dropout
        # Labels of the current sampling / likelihood call and the guidance weight (see ``_eps``).
        self._labels: Tensor | None = None
        self._guidance = 1.0
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got '{decoder}'.")
        if decoder == "discretized" and (data_levels is None or data_levels < 2):
            raise ValueError(f"decoder='discretized' models the data's quantisation levels, but data_levels="
                             f"{data_levels}. The CLI links it from the DataModule; continuous data (toy2d) has "
                             f"no levels: use decoder: gaussian there, or pass data_levels=dm.levels.")
        if reverse_variance not in ("posterior", "beta"):
            raise ValueError(f"reverse_variance must be 'posterior' or 'beta', got '{reverse_variance}'.")
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got '{sampler}'.")
        if bound_timesteps is not None and bound_timesteps < 1:
            raise ValueError(f"bound_timesteps must be None (all terms) or >= 1, got {bound_timesteps}.")
        if likelihood_kind not in LIKELIHOOD_KINDS:
            raise ValueError(f"likelihood_kind must be one of {', '.join(LIKELIHOOD_KINDS)}, got '{likelihood_kind}'.")
        if likelihood_divergence not in DIVERGENCE_KINDS:
            raise ValueError(f"likelihood_divergence must be one of {', '.join(DIVERGENCE_KINDS)}, "
                             f"got '{likelihood_divergence}'.")
        self.num_steps = num_steps
        self.schedule = make_schedule(schedule, num_steps)
        self.data_levels, self.decoder = data_levels, decoder
        self.reverse_variance, self.sampler = reverse_variance, sampler
        self.sample_steps, self.ddim_eta = sample_steps, ddim_eta
        self.clip_denoised = len(self.data_shape) == 3 if clip_denoised is None else clip_denoised
        self.bound_timesteps, self.bound_chunk = bound_timesteps, max(1, bound_chunk)
        self.default_likelihood = likelihood_kind  # "bound" or "ode": what log_prob returns by default
        self.likelihood = LIKELIHOOD_KINDS[likelihood_kind]
        self.likelihood_solver = as_solver_config(
            likelihood_solver or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5})
        self.likelihood_divergence = likelihood_divergence
        self.last_log_prob_nfe: int | None = None
        self.eps_model = make_time_backbone(self.data_shape, backbone, hidden=hidden, depth=depth,
                                            base_channels=base_channels, channel_mults=channel_mults,
                                            activation=activation, num_classes=num_classes)

    def diffused_data(self, x: Tensor) -> Tensor:
        """What the forward process starts from: ``x`` itself (``gaussian`` decoder) or the centre of
        its level cell (``discretized``, DDPM on the data's levels). ``(B, ...)`` -> same."""
        if self.decoder == "gaussian":
            return x
        return bin_centre(bin_index(x, self.data_levels), self.data_levels, x.dtype)

    # ---- network and reverse process ----
    def forward(self, xt: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``eps_theta(x_t, t[, y])`` for integer ``t: (B,)``; the network sees ``t / T`` in (0, 1]. A conditional
        model without labels uses its null class."""
        time = t.to(xt.dtype) / self.num_steps
        return self.eps_model(xt, time) if y is None else self.eps_model(xt, time, y)

    def _eps(self, xt: Tensor, t: Tensor) -> Tensor:
        """The noise prediction every reverse-process step uses: ``eps_theta(x_t, t)`` of an unconditional model,
        else the guided prediction for the labels and weight of the current call (:meth:`_conditioned`)."""
        if self._labels is None:
            return self(xt, t)
        return guided(self, xt, t, self._labels, self._guidance, self.num_classes)

    @contextmanager
    def _conditioned(self, labels: Tensor | None, guidance: float = 1.0) -> Iterator[None]:
        """Reverse-process steps inside the block use ``labels: (B,)`` with guidance weight ``guidance``."""
        saved = self._labels, self._guidance
        self._labels, self._guidance = labels, guidance
        try:
            yield
        finally:
            self._labels, self._guidance = saved

    def reverse_var(self, t: Tensor, like: Tensor) -> Tensor:
        """``sigma_t^2`` of ``p(x_{t-1} | x_t)``, broadcastable to ``like``."""
        values = self.schedule.posterior_var if self.reverse_variance == "posterior" else self.schedule.betas
        return NoiseSchedule._at(values, t, like)

    def reverse_mean(self, xt: Tensor, t: Tensor, clip: bool = False) -> Tensor:
        """Mean of ``p(x_{t-1} | x_t)``: the posterior mean at the predicted ``x0_hat``."""
        x0_hat = self.schedule.predict_x0(xt, t, self._eps(xt, t))
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        return self.schedule.posterior_mean(x0_hat, xt, t)

    # ---- objective ----
    def training_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """DDPM's ``L_simple``: mean squared error of the predicted noise, ``t ~ U{1..T}``; a conditional model
        sees the labels ``y: (B,)``, each dropped to the null class with probability ``label_dropout``."""
        y = require_labels("Diffusion", self.num_classes, y, x.shape[0])
        x0 = self.diffused_data(x)
        t = torch.randint(1, self.num_steps + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        labels = None if y is None else drop_labels(y, self.label_dropout, self.num_classes)
        return (self(self.schedule.q_sample(x0, t, noise), t, labels) - noise).pow(2).mean()

    # ---- the variational bound ----
    def prior_term(self, x0: Tensor) -> Tensor:
        """``L_T = KL(q(x_T | x_0) || N(0, I))``: ``(B, ...)`` -> ``(B,)`` nats."""
        t = torch.full((x0.shape[0],), self.num_steps, device=x0.device)
        mean, std = self.schedule.q_mean_std(x0, t)
        return gaussian_kl(mean, std ** 2, torch.zeros_like(mean), torch.ones_like(std)).flatten(1).sum(-1)

    def decoder_log_prob(self, x0: Tensor, x1: Tensor) -> Tensor:
        """``log p(x_0 | x_1)`` of the decoder ``N(x0_hat(x_1, 1), beta_1 I)``, a model-space density: the
        Gaussian's density at ``x_0`` (``gaussian``) or its mass on ``x_0``'s level cells, edge cells open,
        as the piecewise-constant density (``discretized``, DDPM's eq. 13). ``(B, ...)`` -> ``(B,)`` nats."""
        t = torch.ones(x1.shape[0], dtype=torch.long, device=x1.device)
        mean = self.reverse_mean(x1, t, clip=self.clip_denoised)
        log_scale = 0.5 * torch.log(NoiseSchedule._at(self.schedule.betas, t, x1))
        if self.decoder == "gaussian":
            return (-0.5 * ((x0 - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * LOG_2PI).flatten(1).sum(-1)
        k = bin_index(x0, self.data_levels)
        log_p_levels = discretized_gaussian_log_prob(k, mean, log_scale, self.data_levels).flatten(1).sum(-1)
        return piecewise_constant_log_density(log_p_levels, self.dim, self.data_levels)

    def decoder_term(self, x0: Tensor) -> Tensor:
        """``L_0 = -log p(x_0 | x_1)`` with one draw of ``x_1 ~ q(x_1 | x_0)``: ``(B, ...)`` -> ``(B,)`` nats."""
        t = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
        return -self.decoder_log_prob(x0, self.schedule.q_sample(x0, t, torch.randn_like(x0)))

    def transition_terms(self, x0: Tensor, t: Tensor) -> Tensor:
        """``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t >= 2``, one draw of ``x_t``.

        ``x0: (B, ...)``, ``t: (B,)`` -> ``(B,)`` nats.
        """
        xt = self.schedule.q_sample(x0, t, torch.randn_like(x0))
        mean_q = self.schedule.posterior_mean(x0, xt, t)
        var_q = NoiseSchedule._at(self.schedule.posterior_var, t, x0)
        kl = gaussian_kl(mean_q, var_q, self.reverse_mean(xt, t, clip=self.clip_denoised), self.reverse_var(t, x0))
        return kl.flatten(1).sum(-1)

    def _chunked_transition_terms(self, x0: Tensor, t: Tensor) -> Tensor:
        """``x0: (B, ...)``, ``t: (B, k)`` -> ``(B, k)``, evaluating ``bound_chunk`` timesteps per call."""
        batch, k = t.shape
        columns = []
        for start in range(0, k, self.bound_chunk):
            tc = t[:, start:start + self.bound_chunk]
            kc = tc.shape[1]
            x_rep = x0.unsqueeze(1).expand(batch, kc, *x0.shape[1:]).reshape(batch * kc, *x0.shape[1:])
            # Each example's label follows its kc copies.
            labels = None if self._labels is None else self._labels.repeat_interleave(kc)
            with nullcontext() if labels is None else self._conditioned(labels, self._guidance):
                columns.append(self.transition_terms(x_rep, tc.reshape(-1)).reshape(batch, kc))
        return torch.cat(columns, 1)

    @torch.no_grad()
    def variational_bound(self, x: Tensor) -> Tensor:
        """DDPM's ``L = L_T + sum_{t>=2} L_{t-1} + L_0``: ``(B, *data_shape)`` -> ``(B,)`` nats, an upper
        bound on ``-log p(x)`` in model space (stochastic: one ``x_t`` draw per term)."""
        x0 = self.diffused_data(x)
        batch, T = x0.shape[0], self.num_steps
        t, weights = bound_timestep_sample(T, self.bound_timesteps or T - 1, batch, x0.device)
        middle = (self._chunked_transition_terms(x0, t) * weights.to(x0.dtype)).sum(1)
        return self.prior_term(x0) + middle + self.decoder_term(x0)

    # ---- the probability-flow ODE ----
    def probability_flow(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The VP probability-flow ODE's field ``dx/dt = -beta(t) / 2 (x + score(x, t))`` with the score
        ``-eps_theta(x, t) / sigma(t)``, at continuous ``t`` in (0, 1]: ``(B, *data_shape)`` -> same."""
        t = broadcast_time(t, x.shape[0], x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        beta = self.schedule.continuous_beta(t).reshape(shape)
        sigma = self.schedule.continuous_sigma(t).reshape(shape)
        eps = self.eps_model(x, t) if self._labels is None else self.eps_model(x, t, self._labels)
        return -0.5 * beta * (x - eps / sigma)

    def log_prob_ode(self, x: Tensor, solver: SolverConfig | None = None) -> Tensor:
        """The exact ``log p(x)`` of the probability-flow ODE (model space, nats), ``(B, *data_shape)`` ->
        ``(B,)``: ``x`` at ``t = 1 / T`` integrated to ``N(0, I)`` at ``t = 1`` with the trace term.
        The solve's evaluations are left in :attr:`last_log_prob_nfe`."""
        self._check_input(x)
        result = ode_log_likelihood(self.probability_flow, x, solver or self.likelihood_solver,
                                    divergence=self.likelihood_divergence, t_noise=1.0,
                                    t_data=1.0 / self.num_steps)
        self.last_log_prob_nfe = result.nfe
        return result.log_prob

    def _ode_label(self) -> str:
        return "estimate" if self.likelihood_divergence == "hutchinson" else "exact"

    @property
    def likelihood_kind(self) -> str:
        """The evaluator's label of what ``log_prob`` returns: ``bound``, or for the ODE ``exact`` (or
        ``estimate`` with Hutchinson's trace)."""
        return "bound" if self.default_likelihood == "bound" else self._ode_label()

    def likelihood_estimators(self) -> dict:
        """Both likelihoods, so the table shows DDPM's bound beside the probability-flow ODE's value."""
        return {"bound": lambda x: self.log_prob(x, kind="bound"), self._ode_label(): self.log_prob_ode}

    def likelihood_traits(self) -> dict:
        """What the bound is, for the evaluator's labels (:mod:`lightning_flows.evaluation.likelihood_labels`):
        DDPM's, on the levels with the discretised decoder; its exponential is no density estimate, so it is not
        importance-weighted over dequantisation draws. The ODE likelihood is described by its kind."""
        return {"bound": {"name": "DDPM bound", "value": "bound", "on_levels": self.decoder == "discretized"}}

    def log_prob(self, x: Tensor, y: Tensor | None = None, kind: str | None = None) -> Tensor:
        """``log p(x)`` in nats per example, model space, ``(B,)``, of the given ``kind`` (default: the
        configured ``likelihood_kind``): ``bound`` is ``-L``, a stochastic lower bound; ``ode`` is exact.
        With labels ``y: (B,)`` a conditional model scores ``p(x | y)``; without, its null-class network."""
        kind = kind or self.default_likelihood
        if kind not in LIKELIHOOD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(LIKELIHOOD_KINDS)}, got '{kind}'.")
        labels = None
        if y is not None:
            if not self.is_conditional:
                raise ValueError("Diffusion is unconditional (num_classes=0); call log_prob(x) without labels.")
            labels = check_labels("Diffusion", self.num_classes, y, x.shape[0]).to(x.device)
        with self._conditioned(labels):
            if kind == "ode":
                return self.log_prob_ode(x)
            self._check_input(x)
            return -self.variational_bound(x)

    # ---- sampling ----
    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0, sampler: str | None = None,
               steps: int | None = None) -> Tensor:
        """``n`` samples ``(n, *data_shape)``; ``sampler``/``steps`` override the configured ones. A conditional
        model draws class ``y[i]`` for sample ``i`` (uniform classes when ``y`` is None), with classifier-free
        guidance weight ``guidance`` on the noise prediction."""
        sampler = sampler or self.sampler
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got '{sampler}'.")
        if not self.is_conditional:
            if y is not None or guidance != 1.0:
                raise ValueError("Diffusion is unconditional (num_classes=0): sample without y and with "
                                 "guidance=1.0, or train a conditional model (data.conditional: true).")
        labels = sampling_labels("Diffusion", self.num_classes, y, n, self.device)
        x = torch.randn(n, *self.data_shape, device=self.device)
        with self._conditioned(labels, guidance):
            return self._ancestral(x) if sampler == "ancestral" else self._ddim(x, steps or self.sample_steps)

    def _ancestral(self, x: Tensor) -> Tensor:
        for step in range(self.num_steps, 0, -1):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            mean = self.reverse_mean(x, t, clip=self.clip_denoised)
            x = mean + self.reverse_var(t, x).sqrt() * torch.randn_like(x) if step > 1 else mean
        self.last_sample_nfe = self.num_steps
        return x

    def _ddim(self, x: Tensor, steps: int) -> Tensor:
        """DDIM (Song et al. 2021) on a subsequence of timesteps; ``eta = 0`` is deterministic."""
        timesteps = ddim_timesteps(self.num_steps, steps)
        alpha_bars = self.schedule.alpha_bars
        for i in range(len(timesteps) - 1, -1, -1):
            step, prev = timesteps[i], timesteps[i - 1] if i > 0 else 0
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            eps = self._eps(x, t)
            x0_hat = self.schedule.predict_x0(x, t, eps)
            if self.clip_denoised:
                x0_hat = x0_hat.clamp(-1, 1)
                eps = self.schedule.eps_from_x0(x, t, x0_hat)
            ab, ab_prev = alpha_bars[step], alpha_bars[prev]
            sigma = self.ddim_eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if prev > 0:
                x = x + sigma * torch.randn_like(x)
        self.last_sample_nfe = len(timesteps)
        return x
