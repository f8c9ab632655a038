"""A normalizing flow as a distribution: a bijection to latent space plus a base density.

``log p_x(x) = log p_z(f(x)) + log|det df/dx|`` (the lecture's change of variables, with ``f`` the
normalizing direction; see :mod:`lightning_flows.flows.base`). Sampling runs ``f^{-1}`` on base
draws, optionally at a temperature ``T`` (``z ~ N(0, T^2 I)``, Glow's trick for cleaner samples).

Class-conditional flows (issues 14 and 21): the *base* depends on the class, ``p(x | y) = N(f_y(x); mu_y,
diag sigma_y^2) |det df_y/dx|``, with a learned mean and log-scale per class for every latent coordinate
(:class:`ClassConditionalNormal`; in a multi-scale flow every factored-out latent is conditioned), and, with
``conditional_bijection``, so does the bijection: the one-hot label is the context of every coupling network
(:mod:`lightning_flows.flows.coupling`). The marginal ``log p(x) = logsumexp_y [log p(x | y) + log p(y)]`` then
needs the flow once per class: :meth:`NormalizingFlow.log_prob_every_class` runs the ``K`` classes as one batch
of ``K * B`` rows (in chunks of at most :data:`MARGINAL_ROWS_PER_PASS` rows); with a label-blind bijection
``f(x)`` is computed once and only the ``K`` base densities differ.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_flows.conditioning import log_prob_every_class, marginalise_classes, one_hot
from lightning_flows.flows.base import Bijection, flatten_sum, with_context

# Rows of one pass of the per-class marginal (K copies of the batch): bounds its activation memory.
MARGINAL_ROWS_PER_PASS = 4096


class StandardNormal(nn.Module):
    """``N(0, I)`` over examples of shape ``shape``."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """``z: (B, *shape)`` -> ``(B,)`` nats."""
        return flatten_sum(-0.5 * z.pow(2)) - 0.5 * math.log(2 * math.pi) * math.prod(self.shape)

    def sample(self, n: int, temperature: float = 1.0, device=None, dtype=None) -> Tensor:
        return temperature * torch.randn(n, *self.shape, device=device, dtype=dtype)


class ClassConditionalNormal(nn.Module):
    """``N(mu_y, diag sigma_y^2)`` over examples of shape ``shape`` for classes ``y in {0, ..., K-1}``, with the
    fixed uniform class prior ``p(y) = 1 / K``.

    ``loc`` and ``log_scale`` (each ``(K, *shape)``) start at zero: every class starts as the standard normal,
    so a conditional flow starts exactly where the unconditional one does. Creating them draws no random
    numbers, so the bijection of a conditional model is initialised identically to the unconditional one.
    """

    def __init__(self, shape: Sequence[int], num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ClassConditionalNormal needs num_classes >= 1, got {num_classes}.")
        self.shape, self.num_classes = tuple(int(s) for s in shape), int(num_classes)
        self.loc = nn.Parameter(torch.zeros(self.num_classes, *self.shape))
        self.log_scale = nn.Parameter(torch.zeros(self.num_classes, *self.shape))

    def log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        """``log p(z | y)``: ``z: (B, *shape)``, ``y: (B,)`` long -> ``(B,)`` nats."""
        return _diagonal_normal_log_prob(z, self.loc[y], self.log_scale[y])

    def log_prob_every_class(self, z: Tensor) -> Tensor:
        """``log p(z | y = k)`` for every class: ``z: (B, *shape)`` -> ``(B, K)`` nats."""
        return _diagonal_normal_log_prob(z.unsqueeze(1), self.loc, self.log_scale)

    def sample(self, y: Tensor, temperature: float = 1.0) -> Tensor:
        """One draw per label ``y: (n,)``: ``z = mu_y + T sigma_y eps`` -> ``(n, *shape)``."""
        eps = torch.randn(y.shape[0], *self.shape, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc[y] + temperature * torch.exp(self.log_scale[y]) * eps


def _diagonal_normal_log_prob(z: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """``log N(z; loc, diag exp(log_scale)^2)`` summed over the example's dims (the trailing ``ndim - 1``
    dims of ``loc``); broadcasting over the leading ones."""
    example_dims = tuple(range(-(loc.ndim - 1), 0))
    per_dim = -0.5 * ((z - loc) * torch.exp(-log_scale)).pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(dim=example_dims)


class NormalizingFlow(nn.Module):
    """``bijection`` (data -> latent, shape-preserving) with a standard normal base, or with a class-conditional
    one (:class:`ClassConditionalNormal`) when ``num_classes > 0``.

    Args:
        bijection: the composed layers, ``(B, *shape) [, context (B, K)] -> ((B, *shape), (B,))``.
        shape: shape of one example.
        num_classes: ``K`` classes for ``p(x | y)`` (0: unconditional, a parameter-free standard normal base).
        conditional_bijection: the bijection takes the one-hot label as its context (its couplings were built
            with ``context_dim = K``); otherwise only the base depends on the class.
    """

    def __init__(self, bijection: Bijection, shape: Sequence[int], num_classes: int = 0,
                 conditional_bijection: bool = False):
        super().__init__()
        if conditional_bijection and not num_classes:
            raise ValueError("a conditional bijection needs num_classes > 0.")
        self.bijection = bijection
        self.num_classes = num_classes
        self.conditional_bijection = conditional_bijection
        self.base = ClassConditionalNormal(shape, num_classes) if num_classes else StandardNormal(shape)

    def context(self, y: Tensor | None, like: Tensor) -> Tensor | None:
        """The bijection's context for labels ``y: (B,)``: one-hot ``(B, K)``, or None for a label-blind one."""
        if y is None or not self.conditional_bijection:
            return None
        return one_hot(y, self.num_classes, like)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x -> (z, log|det dz/dx|)``, given labels ``y: (B,)`` when the bijection is conditional."""
        if self.conditional_bijection and y is None:
            raise ValueError("this flow's bijection depends on the class: pass labels y, or use log_prob(x) for "
                             "the marginal over classes.")
        return with_context(self.bijection, "forward", x, self.context(y, x))

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return with_context(self.bijection, "inverse", z, self.context(y, z))

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``x: (B, *shape)`` -> ``(B,)`` exact log-density in nats: ``log p(x)``, or ``log p(x | y)`` for
        labels ``y: (B,)`` (conditional flows only; without them a conditional flow gives the marginal)."""
        if not self.num_classes:
            if y is not None:
                raise ValueError("this flow is unconditional (num_classes=0) and takes no class labels.")
            z, log_det = self.bijection(x)
            return self.base.log_prob(z) + log_det
        if y is None:
            return self.marginal_log_prob(x)
        z, log_det = self(x, y)
        return self.base.log_prob(z, y) + log_det

    def log_prob_every_class(self, x: Tensor) -> Tensor:
        """``log p(x | y = k)`` for every class: ``x: (B, *shape)`` -> ``(B, K)`` nats."""
        if not self.num_classes:
            raise ValueError("this flow is unconditional (num_classes=0): it has no per-class densities.")
        if not self.conditional_bijection:  # one pass: only the base depends on the class
            z, log_det = self.bijection(x)
            return self.base.log_prob_every_class(z) + log_det[:, None]
        def log_prob_given(rows: Tensor, labels: Tensor) -> Tensor:
            z, log_det = self(rows, labels)
            return self.base.log_prob(z, labels) + log_det

        return log_prob_every_class(log_prob_given, x, self.num_classes, MARGINAL_ROWS_PER_PASS)

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = logsumexp_k [log p(x | k) + log p(k)]``: ``(B, *shape)`` -> ``(B,)`` nats."""
        return self.marginalise(self.log_prob_every_class(x))

    def marginalise(self, every_class: Tensor) -> Tensor:
        """``(B, K)`` per-class log-densities -> ``(B,)`` ``logsumexp_k [log p(x | k) + log p(k)]``."""
        return marginalise_classes(every_class)

    def sample(self, n: int, temperature: float = 1.0, y: Tensor | None = None) -> Tensor:
        """``n`` draws ``(n, *shape)``; a conditional flow draws class ``y[i]`` for row ``i`` (``y: (n,)``)."""
        if self.num_classes:
            if y is None or y.shape != (n,):
                raise ValueError(f"a conditional flow samples one class per draw: pass labels y of shape ({n},).")
            return self.inverse(self.base.sample(y, temperature), y)
        ref = next(self.parameters())
        z = self.base.sample(n, temperature, device=ref.device, dtype=ref.dtype)
        return self.bijection.inverse(z)


__all__ = ["ClassConditionalNormal", "StandardNormal", "NormalizingFlow"]
