"""RealNVP (Dinh et al. 2017): affine couplings, trained by exact maximum likelihood.

Vectors (toy 2D, or images flattened with ``architecture="mlp"``): ``steps`` couplings with MLP
conditioners and alternating masks, each preceded by ActNorm. Images (``architecture="multiscale"``):
per level ``steps`` checkerboard couplings, squeeze, ``steps`` channel couplings, then half of the
channels are factored out and the rest go to the next level; the last level is ``steps``
checkerboard couplings. ``levels`` counts the levels (each but the last halves H and W).

:class:`ExactFlowModel` is the Lightning plumbing shared with Glow: loss = NLL in nats per dimension
(a well-scaled optimisation target); ``log_prob`` = exact nats per example in model space;
validation/test also log ``{stage}/nll`` (nats/example) and ``{stage}/bpd`` through the DataModule's
shared bits/dim helper (no family computes its own).

Class-conditional (``num_classes = K > 0``, issues 14 and 21): with ``conditional_couplings`` (the default) the
one-hot label enters every coupling network (affine s/t, spline parameters, Glow's split prior), added to each of
its hidden layers, so every layer's transformation depends on the class; under it sits a Gaussian base with a
learned mean and log-scale per class over the *whole* latent (every factored-out half of a multi-scale flow and
the final one), initialised to the standard normal, with the fixed uniform class prior ``p(y) = 1/K``
(:class:`lightning_flows.flows.ClassConditionalNormal`). ``conditional_couplings=False`` keeps only the per-class
base (issue 14's design; its samples follow their class far less often, see the conditional configs).
Training maximises the exact ``log p(x | y)``; ``log_prob(x, y)`` is exact and ``log_prob(x)`` the exact marginal
``logsumexp_y [log p(x | y) + log p(y)]`` (one flow pass per class, the ``K`` classes batched together), which is
what ``{stage}/nll`` and ``{stage}/bpd`` report (comparable with unconditional models);
``{stage}/nll_given_class`` is ``-log p(x | y)``. ``sample(n, y)`` draws class ``y[i]`` for row ``i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lightning_flows.flows import (ActNorm, AffineCoupling, Bijection, ConvConditioner, FactorOut, FlowSequence,
                                   MLPConditioner, NormalizingFlow, Reshape, SplineCoupling, Squeeze,
                                   Unsqueeze, channel_mask, checkerboard_mask, spline_params_per_dim, vector_mask)
from lightning_flows.conditioning import (check_labels, check_no_guidance, check_num_classes, require_labels,
                                         sampling_labels)
from lightning_flows.flows.preprocess import preprocessing_layers
from lightning_flows.models.base import GenerativeModel, split_batch

ARCHITECTURES = ("auto", "mlp", "multiscale")
COUPLINGS = ("affine", "spline")


def resolve_architecture(architecture: str, data_shape: tuple[int, ...]) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture '{architecture}'. Choose one of: {', '.join(ARCHITECTURES)}.")
    if architecture == "auto":
        return "multiscale" if len(data_shape) == 3 else "mlp"
    if architecture == "multiscale" and len(data_shape) != 3:
        raise ValueError(f"architecture='multiscale' needs images (C, H, W), got data_shape={data_shape}; "
                         f"use architecture='mlp' for vectors.")
    return architecture


def flattened(data_shape: tuple[int, ...], layers: list[Bijection]) -> list[Bijection]:
    """Run vector ``layers`` on flattened examples, restoring the example shape afterwards."""
    if len(data_shape) == 1:
        return layers
    flat = (int(torch.tensor(data_shape).prod()),)
    return [Reshape(data_shape, flat), *layers, Reshape(flat, data_shape)]


class ExactFlowModel(GenerativeModel):
    """A :class:`GenerativeModel` around a :class:`NormalizingFlow` in ``self.flow`` (set by subclasses).

    Subclasses set ``hidden, depth, activation, scale_bound`` and call :meth:`_set_coupling` before
    :meth:`_build_flow`; :meth:`_coupling_layer` then builds either kind of coupling.
    """

    likelihood = "exact"
    objective = "Exact MLE via change-of-vars"
    flow: NormalizingFlow
    num_classes: int = 0
    conditional_couplings: bool = True
    hidden: int
    depth: int
    activation: str
    scale_bound: float

    def _set_coupling(self, coupling: str, spline_bins: int, spline_bound: float) -> None:
        if coupling not in COUPLINGS:
            raise ValueError(f"Unknown coupling '{coupling}'. Choose one of: {', '.join(COUPLINGS)}.")
        if coupling == "spline" and (spline_bins < 2 or spline_bound <= 0):
            raise ValueError(f"spline couplings need spline_bins >= 2 and spline_bound > 0, got "
                             f"spline_bins={spline_bins}, spline_bound={spline_bound}.")
        self.coupling, self.spline_bins, self.spline_bound = coupling, spline_bins, spline_bound

    def _coupling_layer(self, mask: Tensor, kind: str = "") -> Bijection:
        """The configured coupling on ``mask``'s shape: an MLP conditioner for vectors ``(D,)``, a conv one
        for images ``(C, H, W)``. ``kind="affine"`` forces an affine coupling (e.g. Glow's split prior)."""
        kind = kind or self.coupling
        per = 2 if kind == "affine" else spline_params_per_dim(self.spline_bins)
        context = self.num_classes if self._conditional_bijection else 0  # the one-hot label
        if mask.ndim == 1:
            conditioner = MLPConditioner(mask.shape[0], self.hidden, self.depth, self.activation, per, context)
        else:
            conditioner = ConvConditioner(mask.shape[0], self.hidden, self.depth - 1, self.activation, per, context)
        if kind == "affine":
            return AffineCoupling(mask, conditioner, self.scale_bound)
        return SplineCoupling(mask, conditioner, self.spline_bins, self.spline_bound)

    def _build_flow(self, architecture: str, preprocess: str, logit_alpha: float, levels: int, steps: int,
                    num_classes: int = 0) -> None:
        """Preprocessing, then the family's vector layers (flattened) or its multi-scale image levels, and the
        base: standard normal, or class-conditional for ``num_classes > 0``."""
        self.num_classes = check_num_classes(num_classes)
        if not isinstance(self.conditional_couplings, bool):
            raise ValueError(f"conditional_couplings must be true or false, got {self.conditional_couplings!r}.")
        if levels < 1 or steps < 1:
            raise ValueError(f"levels and steps must be >= 1, got levels={levels}, steps={steps}.")
        shape = self.data_shape
        architecture = resolve_architecture(architecture, shape)  # its error first: it names the vector architecture
        layers = preprocessing_layers(preprocess, shape, logit_alpha)
        if architecture == "mlp":
            layers += flattened(shape, self._vector_layers(self.dim, steps))
        else:
            layers.append(self._level(shape, levels, steps))
        self.flow = NormalizingFlow(FlowSequence(layers), shape, self.num_classes, self._conditional_bijection)

    @property
    def _conditional_bijection(self) -> bool:
        """The couplings read the label (a conditional model with ``conditional_couplings``)."""
        return bool(self.num_classes) and self.conditional_couplings

    def _vector_layers(self, dim: int, steps: int) -> list[Bijection]:
        raise NotImplementedError

    def _level(self, shape: tuple[int, int, int], levels: int, steps: int) -> Bijection:
        raise NotImplementedError

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``x: (B, *data_shape)`` in model space -> ``(B,)`` exact log-density, nats per example:
        ``log p(x | y)`` for labels ``y: (B,)``, else ``log p(x)`` (the marginal over classes when conditional)."""
        if y is not None:
            y = check_labels(type(self).__name__, self.num_classes, y, x.shape[0])
        return self.flow.log_prob(x, y)

    def training_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """NLL in nats per dimension: ``-log p(x) / D``, or ``-log p(x | y) / D`` when conditional."""
        y = require_labels(type(self).__name__, self.num_classes, y, x.shape[0])
        return -self.flow.log_prob(x, y).mean() / self.dim

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0, temperature: float = 1.0) -> Tensor:
        """``n`` samples ``(n, *data_shape)``; ``temperature < 1`` draws ``z ~ N(mu, T^2 sigma^2)``.

        ``y: (n,)`` requested classes (conditional models; uniform draws when None). ``guidance`` must be 1.0:
        flows have no classifier-free guidance.
        """
        check_no_guidance(type(self).__name__, guidance)
        labels = sampling_labels(type(self).__name__, self.num_classes, y, n, self.device)
        self.last_sample_nfe = 1  # one pass through the inverse network
        return self.flow.sample(n, temperature, labels)

    def _step(self, batch: Tensor | tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = split_batch(batch)
        self._check_input(x)
        y = require_labels(type(self).__name__, self.num_classes, y, x.shape[0])
        if stage != "train" and y is not None:
            # Every class's log p(x | k) once: the objective -log p(x | y) and the marginal -log p(x), which is
            # what nll/bpd report (comparable with unconditional models).
            every_class = self.flow.log_prob_every_class(x)
            nll = -every_class.gather(1, y[:, None]).squeeze(1)
            marginal = -self.flow.marginalise(every_class)
        else:
            nll = -self.flow.log_prob(x, y)  # the objective: -log p(x), or -log p(x | y)
            marginal = nll
        loss = nll.mean() / self.dim
        size = x.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", sync_dist=stage != "train", batch_size=size)
        if stage != "train":
            if y is not None:
                self.log(f"{stage}/nll_given_class", nll.mean(), sync_dist=True, batch_size=size)
            nll = marginal
            self.log(f"{stage}/nll", nll.mean(), sync_dist=True, batch_size=size)
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is not None and hasattr(datamodule, "bits_per_dim"):
                self.log(f"{stage}/bpd", datamodule.bits_per_dim(nll.mean()), sync_dist=True, batch_size=size,
                         prog_bar=True)
        return loss


class RealNVP(ExactFlowModel):
    """RealNVP for vectors or images.

    Args:
        data_shape: one example's shape (linked from the DataModule by the CLI).
        architecture: ``auto`` (multiscale for images, mlp for vectors), ``mlp`` or ``multiscale``.
        levels: multi-scale levels ``L`` (images only; each but the last halves H and W).
        steps: couplings per stage ``K`` (vectors: total couplings).
        hidden, depth, activation: conditioner width, hidden layers, activation.
        coupling: ``affine`` (RealNVP's) or ``spline`` (rational-quadratic, Durkan et al. 2019).
        scale_bound: ``|s| <= scale_bound`` in every affine coupling (stability).
        spline_bins, spline_bound: spline couplings' bins ``K`` and interval ``[-B, B]`` (identity outside).
        actnorm: an ActNorm before every coupling (data-dependent init, DDP-synchronised).
        preprocess: ``auto`` (logit for images), ``logit`` or ``none``; its log-det is part of ``log_prob``.
        logit_alpha: the logit's boundary margin.
        num_classes: classes ``K`` of a class-conditional base (0: unconditional); linked from the DataModule by
            the CLI (``data.conditional: true``), never written in a config.
        conditional_couplings: with ``num_classes > 0``, the one-hot label also enters every coupling network
            (false: only the per-class base depends on the class, issue 14's design).
    """

    def __init__(self, data_shape: Sequence[int] = (2,), architecture: str = "auto", levels: int = 2,
                 steps: int = 4, hidden: int = 64, depth: int = 2, activation: str = "relu",
                 coupling: str = "affine", scale_bound: float = 2.0, spline_bins: int = 8,
                 spline_bound: float = 3.0, actnorm: bool = True, preprocess: str = "auto",
                 logit_alpha: float = 0.05, lr: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_steps: int = 0, num_classes: int = 0,
                 conditional_couplings: bool = True):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.hidden, self.depth, self.activation = hidden, depth, activation
        self.scale_bound, self.use_actnorm = scale_bound, actnorm
        self._set_coupling(coupling, spline_bins, spline_bound)
        self.conditional_couplings = conditional_couplings
        self._build_flow(architecture, preprocess, logit_alpha, levels, steps, num_classes)

    def _coupling(self, mask: Tensor) -> list[Bijection]:
        coupling = self._coupling_layer(mask)
        return [ActNorm(mask.shape[0]), coupling] if self.use_actnorm else [coupling]

    def _vector_layers(self, dim: int, steps: int) -> list[Bijection]:
        layers: list[Bijection] = []
        for i in range(steps):
            layers += self._coupling(vector_mask(dim, i))
        return layers

    def _image_couplings(self, shape: tuple[int, int, int], steps: int, make_mask) -> list[Bijection]:
        layers: list[Bijection] = []
        for i in range(steps):
            layers += self._coupling(make_mask(shape, i % 2))
        return layers

    def _level(self, shape: tuple[int, int, int], levels: int, steps: int) -> Bijection:
        c, h, w = shape
        layers = self._image_couplings(shape, steps, checkerboard_mask)
        if levels == 1:
            return FlowSequence(layers)
        if h % 2 or w % 2:
            raise ValueError(f"RealNVP level input {shape} has an odd side and cannot be squeezed; "
                             f"lower `levels` (now {levels} left).")
        squeezed = (4 * c, h // 2, w // 2)
        layers += [Squeeze(), *self._image_couplings(squeezed, steps, channel_mask)]
        inner = self._level((2 * c, h // 2, w // 2), levels - 1, steps)
        layers += [FactorOut(inner, keep=2 * c), Unsqueeze()]
        return FlowSequence(layers)
