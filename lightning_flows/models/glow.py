"""Glow (Kingma & Dhariwal 2018): steps of ActNorm -> invertible 1x1 conv -> affine coupling.

Images: per level, squeeze, ``steps`` flow steps with conv couplings on channel halves, then (except
at the last level) a learned prior for the factored-out half -- an affine coupling of that half
conditioned on the kept half, which is exactly Glow's conditional Gaussian ``N(mu(h), sigma(h))`` --
and the split. Vectors (toy 2D, flattened images): the 1x1 convolution becomes a dense invertible
``D x D`` linear map, which is meaningful even for ``D = 2`` (it rotates/shears the coupling axes),
so Glow runs on toy 2D data as well.
"""

from __future__ import annotations

from typing import Sequence

from lightning_flows.flows import (ActNorm, Bijection, FactorOut, FlowSequence, InvertibleConv1x1, Squeeze,
                                   Unsqueeze, channel_mask, vector_mask)
from lightning_flows.models.realnvp import ExactFlowModel


class GlowSteps(ExactFlowModel):
    """Glow's architecture for the coupling a subclass configures (:class:`Glow`: affine, :class:`NSF`: spline).

    A step is ``[ActNorm] -> [invertible linear map] -> coupling``; both optional parts are on in Glow.
    Subclasses set ``hidden, depth, activation, scale_bound, learned_prior`` (and may switch the optional
    parts off), call ``_set_coupling`` and then ``_build_flow``.
    """

    learned_prior: bool
    use_actnorm: bool = True
    use_invertible_linear: bool = True

    def _flow_step(self, channels: int, coupling: Bijection) -> list[Bijection]:
        layers: list[Bijection] = [ActNorm(channels)] if self.use_actnorm else []
        if self.use_invertible_linear:
            layers.append(InvertibleConv1x1(channels))
        return [*layers, coupling]

    def _vector_layers(self, dim: int, steps: int) -> list[Bijection]:
        layers: list[Bijection] = []
        for i in range(steps):
            layers += self._flow_step(dim, self._coupling_layer(vector_mask(dim, i)))
        return layers

    def _conv_coupling(self, shape: tuple[int, int, int], parity: int, kind: str = "") -> Bijection:
        return self._coupling_layer(channel_mask(shape, parity), kind)

    def _level(self, shape: tuple[int, int, int], levels: int, steps: int) -> Bijection:
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"Glow level input {shape} has an odd side and cannot be squeezed; "
                             f"lower `levels` (H and W must be divisible by 2**levels).")
        squeezed = (4 * c, h // 2, w // 2)
        layers: list[Bijection] = [Squeeze()]
        for i in range(steps):
            layers += self._flow_step(4 * c, self._conv_coupling(squeezed, i % 2))
        if levels > 1:
            if self.learned_prior:
                # Transforms the factored-out half (mask keeps the first half) given the kept half.
                # Affine whatever the steps use: it is exactly the conditional Gaussian N(mu(h), sigma(h)).
                layers.append(self._conv_coupling(squeezed, 0, kind="affine"))
            inner = self._level((2 * c, h // 2, w // 2), levels - 1, steps)
            layers.append(FactorOut(inner, keep=2 * c))
        layers.append(Unsqueeze())
        return FlowSequence(layers)


class Glow(GlowSteps):
    """Glow for vectors or images.

    Args:
        data_shape: one example's shape (linked from the DataModule by the CLI).
        architecture: ``auto`` (multiscale for images, mlp for vectors), ``mlp`` or ``multiscale``.
        levels: multi-scale levels ``L`` (images only; every level squeezes, so H and W must be
            divisible by ``2**levels``).
        steps: flow steps per level ``K`` (vectors: total steps).
        hidden, depth, activation: coupling network width, hidden layers, activation.
        coupling: ``affine`` (Glow's) or ``spline`` (rational-quadratic, Durkan et al. 2019).
        scale_bound: ``|s| <= scale_bound`` in every affine coupling (stability).
        spline_bins, spline_bound: spline couplings' bins ``K`` and interval ``[-B, B]`` (identity outside).
        learned_prior: condition each factored-out half on the kept half (Glow's split prior).
        preprocess: ``auto`` (logit for images), ``logit`` or ``none``; its log-det is part of ``log_prob``.
        logit_alpha: the logit's boundary margin.
        num_classes: classes ``K`` of a class-conditional base over every latent (0: unconditional); linked from
            the DataModule by the CLI (``data.conditional: true``), never written in a config.
        conditional_couplings: with ``num_classes > 0``, the one-hot label also enters every coupling network
            (false: only the per-class base depends on the class, issue 14's design).
    """

    def __init__(self, data_shape: Sequence[int] = (2,), architecture: str = "auto", levels: int = 2,
                 steps: int = 4, hidden: int = 64, depth: int = 2, activation: str = "relu",
                 coupling: str = "affine", scale_bound: float = 2.0, spline_bins: int = 8, spline_bound: float = 3.0,
                 learned_prior: bool = True, preprocess: str = "auto", logit_alpha: float = 0.05, lr: float = 1e-3,
                 weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_steps: int = 0, num_classes: int = 0,
                 conditional_couplings: bool = True):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.hidden, self.depth, self.activation = hidden, depth, activation
        self.scale_bound, self.learned_prior = scale_bound, learned_prior
        self._set_coupling(coupling, spline_bins, spline_bound)
        self.conditional_couplings = conditional_couplings
        self._build_flow(architecture, preprocess, logit_alpha, levels, steps, num_classes)
