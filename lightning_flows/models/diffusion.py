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

The bound (``variational_bound``, the negative of ``log_prob``) is DDPM's ``L`` in **nats per example
in model space**; it is an upper bound on ``-log p(x_0)``, never the exact NLL:

    L = KL(q(x_T | x_0) || N(0, I))                                      (L_T)
      + sum_{t=2}^T E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     (L_{t-1})
      - E_q log N(x_0; x0_hat(x_1, 1), beta_1 I)                          (L_0)

The decoder at ``t = 1`` is a Gaussian density in model space (not DDPM's discretised decoder), so
``dm.bits_per_dim(L)`` gives a correct dequantised bits/dim bound for image data.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from lightning_flows.models.base import GenerativeModel
from lightning_flows.nn import make_time_backbone

LOG_2PI = math.log(2 * math.pi)
SCHEDULES = ("linear", "cosine")


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

    Args:
        num_steps: ``T``.
        schedule: ``linear`` (DDPM) or ``cosine`` (improved DDPM).
        backbone, hidden, depth, activation, base_channels, channel_mults: the shared
            :func:`make_time_backbone` (UNet for images, MLP for vectors).
        reverse_variance: ``sigma_t^2`` of ``p(x_{t-1} | x_t)``: ``beta`` (``beta_t``, DDPM's CIFAR-10
            choice) or ``posterior`` (``beta~_t``); used by ancestral sampling and by the bound. For
            data with a smooth density (dequantised images) ``beta`` gives the tighter bound: at small
            ``t`` the true reverse variance is close to ``beta_t``, and ``beta~_t`` (about ``beta_t / 2``
            at ``t = 2``) costs a KL of ~0.4 nats per dimension summed over the first steps.
        sampler: ``ancestral`` (``T`` network evaluations) or ``ddim`` (``sample_steps`` evaluations).
        sample_steps: DDIM steps; ``ddim_eta``: 0 for deterministic DDIM, 1 for DDPM-like noise.
        clip_denoised: clamp ``x0_hat`` to [-1, 1] while sampling (default: on for images, whose
            model space is [-1, 1]; off for vectors). The bound never clips.
        bound_timesteps: ``None`` sums all ``T - 1`` KL terms of the bound; an integer ``k`` estimates
            their sum without bias from ``k`` random timesteps per example (cheaper, noisier).
        bound_chunk: timesteps evaluated per network call when computing the bound.
    """

    likelihood = "bound"

    def __init__(self, data_shape: Sequence[int] = (2,), num_steps: int = 1000,
                 schedule: Literal["linear", "cosine"] = "linear", backbone: str = "auto", hidden: int = 256,
                 depth: int = 3, activation: str = "silu", base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2),
                 reverse_variance: Literal["posterior", "beta"] = "beta",
                 sampler: Literal["ancestral", "ddim"] = "ancestral", sample_steps: int = 50,
                 ddim_eta: float = 0.0, clip_denoised: bool | None = None, bound_timesteps: int | None = None,
                 bound_chunk: int = 8, lr: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_steps: int = 0):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        if reverse_variance not in ("posterior", "beta"):
            raise ValueError(f"reverse_variance must be 'posterior' or 'beta', got '{reverse_variance}'.")
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got '{sampler}'.")
        if bound_timesteps is not None and bound_timesteps < 1:
            raise ValueError(f"bound_timesteps must be None (all terms) or >= 1, got {bound_timesteps}.")
        self.num_steps = num_steps
        self.schedule = make_schedule(schedule, num_steps)
        self.reverse_variance, self.sampler = reverse_variance, sampler
        self.sample_steps, self.ddim_eta = sample_steps, ddim_eta
        self.clip_denoised = len(self.data_shape) == 3 if clip_denoised is None else clip_denoised
        self.bound_timesteps, self.bound_chunk = bound_timesteps, max(1, bound_chunk)
        self.eps_model = make_time_backbone(self.data_shape, backbone, hidden=hidden, depth=depth,
                                            base_channels=base_channels, channel_mults=channel_mults,
                                            activation=activation)

    # ---- network and reverse process ----
    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        """``eps_theta(x_t, t)`` for integer ``t: (B,)``; the network sees ``t / T`` in (0, 1]."""
        return self.eps_model(xt, t.to(xt.dtype) / self.num_steps)

    def reverse_var(self, t: Tensor, like: Tensor) -> Tensor:
        """``sigma_t^2`` of ``p(x_{t-1} | x_t)``, broadcastable to ``like``."""
        values = self.schedule.posterior_var if self.reverse_variance == "posterior" else self.schedule.betas
        return NoiseSchedule._at(values, t, like)

    def reverse_mean(self, xt: Tensor, t: Tensor, clip: bool = False) -> Tensor:
        """Mean of ``p(x_{t-1} | x_t)``: the posterior mean at the predicted ``x0_hat``."""
        x0_hat = self.schedule.predict_x0(xt, t, self(xt, t))
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        return self.schedule.posterior_mean(x0_hat, xt, t)

    # ---- objective ----
    def training_loss(self, x0: Tensor) -> Tensor:
        """DDPM's ``L_simple``: mean squared error of the predicted noise, ``t ~ U{1..T}``."""
        t = torch.randint(1, self.num_steps + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return (self(self.schedule.q_sample(x0, t, noise), t) - noise).pow(2).mean()

    # ---- the variational bound ----
    def prior_term(self, x0: Tensor) -> Tensor:
        """``L_T = KL(q(x_T | x_0) || N(0, I))``: ``(B, ...)`` -> ``(B,)`` nats."""
        t = torch.full((x0.shape[0],), self.num_steps, device=x0.device)
        mean, std = self.schedule.q_mean_std(x0, t)
        return gaussian_kl(mean, std ** 2, torch.zeros_like(mean), torch.ones_like(std)).flatten(1).sum(-1)

    def decoder_term(self, x0: Tensor) -> Tensor:
        """``L_0 = -log N(x_0; x0_hat(x_1), beta_1 I)`` with one draw of ``x_1``: ``(B,)`` nats."""
        t = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
        x1 = self.schedule.q_sample(x0, t, torch.randn_like(x0))
        mean = self.reverse_mean(x1, t)
        var = NoiseSchedule._at(self.schedule.betas, t, x0)
        return (0.5 * ((x0 - mean) ** 2 / var + torch.log(var) + LOG_2PI)).flatten(1).sum(-1)

    def transition_terms(self, x0: Tensor, t: Tensor) -> Tensor:
        """``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t >= 2``, one draw of ``x_t``.

        ``x0: (B, ...)``, ``t: (B,)`` -> ``(B,)`` nats.
        """
        xt = self.schedule.q_sample(x0, t, torch.randn_like(x0))
        mean_q = self.schedule.posterior_mean(x0, xt, t)
        var_q = NoiseSchedule._at(self.schedule.posterior_var, t, x0)
        kl = gaussian_kl(mean_q, var_q, self.reverse_mean(xt, t), self.reverse_var(t, x0))
        return kl.flatten(1).sum(-1)

    def _chunked_transition_terms(self, x0: Tensor, t: Tensor) -> Tensor:
        """``x0: (B, ...)``, ``t: (B, k)`` -> ``(B, k)``, evaluating ``bound_chunk`` timesteps per call."""
        batch, k = t.shape
        columns = []
        for start in range(0, k, self.bound_chunk):
            tc = t[:, start:start + self.bound_chunk]
            kc = tc.shape[1]
            x_rep = x0.unsqueeze(1).expand(batch, kc, *x0.shape[1:]).reshape(batch * kc, *x0.shape[1:])
            columns.append(self.transition_terms(x_rep, tc.reshape(-1)).reshape(batch, kc))
        return torch.cat(columns, 1)

    @torch.no_grad()
    def variational_bound(self, x0: Tensor) -> Tensor:
        """DDPM's ``L = L_T + sum_{t>=2} L_{t-1} + L_0``: ``(B, *data_shape)`` -> ``(B,)`` nats, an upper
        bound on ``-log p(x_0)`` in model space (stochastic: one ``x_t`` draw per term)."""
        batch, T = x0.shape[0], self.num_steps
        if self.bound_timesteps is None:
            t = torch.arange(2, T + 1, device=x0.device).expand(batch, T - 1)
            middle = self._chunked_transition_terms(x0, t).sum(1)
        else:
            t = torch.randint(2, T + 1, (batch, self.bound_timesteps), device=x0.device)
            middle = (T - 1) * self._chunked_transition_terms(x0, t).mean(1)
        return self.prior_term(x0) + middle + self.decoder_term(x0)

    def log_prob(self, x: Tensor) -> Tensor:
        """``-L``: a (stochastic) lower bound on ``log p(x)`` in nats per example, model space, ``(B,)``."""
        self._check_input(x)
        return -self.variational_bound(x)

    # ---- sampling ----
    @torch.no_grad()
    def sample(self, n: int, sampler: str | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples ``(n, *data_shape)``; ``sampler``/``steps`` override the configured ones."""
        sampler = sampler or self.sampler
        x = torch.randn(n, *self.data_shape, device=self.device)
        if sampler == "ancestral":
            return self._ancestral(x)
        if sampler == "ddim":
            return self._ddim(x, steps or self.sample_steps)
        raise ValueError(f"sampler must be 'ancestral' or 'ddim', got '{sampler}'.")

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
            eps = self(x, t)
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
