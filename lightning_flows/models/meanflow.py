"""MeanFlow (Geng et al. 2025): flow matching's path, but the network learns the *average* velocity over an
interval, so one network evaluation jumps from noise to data.

The network ``u_theta(z, a, b[, y])`` takes the start time ``a`` and the interval ``b - a`` (the flow-matching
backbones with a second time input). Training (:mod:`lightning_flows.flow_matching.mean_flow`, which also maps
the paper's time convention onto this project's, noise at ``t = 0`` and data at ``t = 1``): ``x0 ~ N(0, I)``,
``(a, b)`` from :class:`MeanFlowTimes`, ``z = (1 - a) x0 + a x1``, ``v = x1 - x0``, and
``u_theta(z, a, b)`` regresses ``sg(v + (b - a) d/da u_theta)`` (one ``torch.func.jvp``) with the adaptive
weight of :class:`AdaptiveWeighting`. No teacher, no ODE in training. With ``target_velocity: batch`` the pairs
with ``b > a`` take for ``v`` its posterior mean over the batch's data in place of the one pair's ``x1 - x0``
(:mod:`lightning_flows.flow_matching.batch_velocity`): on 8 Gaussians that noise, not the network, was what kept the
one-step map wide (the same MLP distilled from the model's own 8-step map reached the data's cross-entropy).

Sampling with ``k`` steps (``sampling.steps``; ``k`` network evaluations): on the uniform grid
``0 = t_0 < ... < t_k = 1``, ``z_{i+1} = z_i + (t_{i+1} - t_i) u_theta(z_i, t_i, t_{i+1})`` from ``z_0 ~ N(0, I)``;
``k = 1`` is the paper's one-step ``x = z_0 + u_theta(z_0, 0, 1)``.

Likelihood: ``u_theta(z, t, t)`` is the instantaneous velocity, a CNF in its own right, whose exact density
:func:`lightning_flows.ode.ode_log_likelihood` computes (``likelihood_ode``: solver, exact trace or Hutchinson).
It is the density of *that ODE's* samples, not of the one-step sampler's (the two agree only as far as the
average velocity is consistent with the instantaneous one), hence its kinds ``exact_instantaneous`` /
``estimate_instantaneous``.

Class-conditional (``num_classes > 0``) with the paper's classifier-free guidance folded into training
(:class:`MeanFlowGuidance`): labels are dropped to the null class with probability ``label_dropout``; for the
kept ones the velocity in the target becomes
``v~ = w (x1 - x0) + k u(z, a, a | y) + (1 - w - k) u(z, a, a | null)`` (both network terms without gradient,
one call on the doubled batch), so the network learns the guided field's average velocity and one-step
sampling stays one network evaluation. ``sample(n, y, guidance=g)`` may mix the branches once more
(``u_null + g (u_y - u_null)``, one call on the doubled batch); ``g = 1`` (the default) uses the trained,
already guided, ``u(z, a, b | y)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch
from torch import Tensor

from lightning_flows.conditioning import check_labels, check_num_classes, require_labels, sampling_labels
from lightning_flows.flow_matching import linear_path
from lightning_flows.flow_matching.batch_velocity import batch_marginal_velocity
from lightning_flows.flow_matching.likelihood import ODELikelihoodOptions
from lightning_flows.flow_matching.mean_flow import (AdaptiveWeighting, MeanFlowTimes, adaptive_loss, broadcast_to,
                                                     mean_flow_target)
from lightning_flows.models.base import GenerativeModel
from lightning_flows.models.options import as_options, store_plain_hyperparameters
from lightning_flows.nn.backbone_options import TimeBackboneOptions
from lightning_flows.nn.class_conditioning import drop_labels, guided, null_labels
from lightning_flows.ode import ode_log_likelihood

__all__ = ["JVP_TANGENTS", "MeanFlow", "MeanFlowGuidance", "MeanFlowSampling", "sampling_steps"]

JVP_TANGENTS = ("path", "model")
TARGET_VELOCITIES = ("path", "batch")


@dataclass
class MeanFlowSampling:
    """``steps``: jumps (network evaluations) on the uniform time grid from noise to data; 1: one-step sampling."""

    steps: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"MeanFlow samples with steps >= 1 network evaluations, got {self.steps}.")


@dataclass
class MeanFlowGuidance:
    """Classifier-free guidance of a class-conditional MeanFlow, folded into the training target.

    Args:
        label_dropout: probability that a training label is replaced by the null class (trains the
            unconditional branch the guided target uses).
        scale: ``w`` in ``v~ = w v + k u(.|y) + (1 - w - k) u(.|null)``; 1 with ``mix = 0``: no guidance.
        mix: ``k``, the share of the model's own conditional velocity (the paper's appendix; 0 in its main text).
    """

    label_dropout: float = 0.1
    scale: float = 1.0
    mix: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")

    @property
    def folded(self) -> bool:
        """Whether the target differs from the plain conditional one (needs the model's own velocities)."""
        return self.scale != 1.0 or self.mix != 0.0


class MeanFlow(GenerativeModel):
    """MeanFlow for vectors or images (see the module docstring).

    Args:
        data_shape: one example's shape (linked from the DataModule by the CLI).
        backbone: :class:`TimeBackboneOptions` (MLP or UNet, built with the second time input), or its dict.
        times: :class:`MeanFlowTimes`, the training intervals (distribution, share with ``b = a``).
        loss: :class:`AdaptiveWeighting` (power ``p``, ``eps``).
        sampling: :class:`MeanFlowSampling` (steps).
        likelihood_ode: :class:`ODELikelihoodOptions` of the instantaneous field's exact likelihood.
        guidance: :class:`MeanFlowGuidance` (conditional models).
        jvp_tangent: ``dz/da`` in the target's total derivative: ``path`` (the paper: the path's ``x1 - x0``, one
            noisy draw of the marginal velocity) or ``model`` (the network's own instantaneous velocity
            ``u_theta(z, a, a)`` without gradient, as improved MeanFlow (Geng et al., Dec 2025) does: one more
            forward per step, no per-example noise in the tangent). The target's ``v`` stays the path's.
        num_classes: classes of the labels (linked from a ``conditional: true`` DataModule); 0 = unconditional.
    """

    likelihood = "exact"
    objective = "Regression on the MeanFlow identity (average velocity)"

    def __init__(self, data_shape: Sequence[int] = (2,), backbone: TimeBackboneOptions | dict | None = None,
                 times: MeanFlowTimes | dict | None = None, loss: AdaptiveWeighting | dict | None = None,
                 sampling: MeanFlowSampling | dict | None = None,
                 likelihood_ode: ODELikelihoodOptions | dict | None = None,
                 guidance: MeanFlowGuidance | dict | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0, num_classes: int = 0,
                 jvp_tangent: str = "path", target_velocity: str = "path"):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        if jvp_tangent not in JVP_TANGENTS:
            raise ValueError(f"Unknown jvp_tangent '{jvp_tangent}'. Choose one of: {', '.join(JVP_TANGENTS)}.")
        self.jvp_tangent = jvp_tangent
        if target_velocity not in TARGET_VELOCITIES:
            raise ValueError(f"Unknown target_velocity '{target_velocity}'. Choose one of: "
                             f"{', '.join(TARGET_VELOCITIES)}.")
        self.target_velocity = target_velocity
        self.backbone_options = as_options(TimeBackboneOptions, backbone, "backbone")
        self.times = as_options(MeanFlowTimes, times, "times")
        self.loss_weighting = as_options(AdaptiveWeighting, loss, "loss")
        self.sampling = as_options(MeanFlowSampling, sampling, "sampling")
        self.likelihood_ode = as_options(ODELikelihoodOptions, likelihood_ode, "likelihood_ode")
        self.guidance = as_options(MeanFlowGuidance, guidance, "guidance")
        store_plain_hyperparameters(self, backbone=self.backbone_options, times=self.times, loss=self.loss_weighting,
                                    sampling=self.sampling, likelihood_ode=self.likelihood_ode, guidance=self.guidance)
        self.num_classes = check_num_classes(num_classes)
        # Resolved once, so likelihood_kind and log_prob always agree.
        self.likelihood_divergence = self.likelihood_ode.divergence_for(self.dim)
        self.last_log_prob_nfe: int | None = None
        self.velocity = self.backbone_options.build(self.data_shape, self.num_classes, interval_time=True)

    # ---- the network ----
    def average_velocity(self, z: Tensor, a: Tensor | float, b: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``u_theta(z, a, b[, y])``: the average velocity from time ``a`` (where ``z: (B, *data_shape)`` lives) to
        ``b``; ``a, b`` scalars or ``(B,)``; ``y`` None: unconditional (a conditional model's null class)."""
        return self.velocity(z, a, y, interval=b - a)

    def instantaneous_velocity(self, z: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``u_theta(z, t, t[, y]) = v(z, t)``: the field of the model's ODE."""
        return self.velocity(z, t, y, interval=0.0)

    forward = average_velocity

    def _jump(self, z: Tensor, a, labels: Tensor | None, interval: float) -> Tensor:
        """``u(z, a, a + interval | labels)`` with the backbone's argument order (what :func:`guided` calls)."""
        return self.velocity(z, a, labels, interval=interval)

    # ---- training ----
    def guided_velocity(self, z: Tensor, a: Tensor, velocity: Tensor, labels: Tensor) -> Tensor:
        """The velocity of the guided target, ``w v + k u(z, a, a | y) + (1 - w - k) u(z, a, a | null)`` for kept
        labels and ``v`` where ``labels`` are the null class (dropped), ``(B, *data_shape)``."""
        return self._guided_velocity_and_own(z, a, velocity, labels)[0]

    def _guided_velocity_and_own(self, z: Tensor, a: Tensor, velocity: Tensor,
                                 labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`guided_velocity`, and the model's own ``u(z, a, a | labels)`` (no graph) where folded guidance
        computed it on the way (``None`` otherwise): the tangent ``jvp_tangent: model`` needs, so a guided
        conditional model does not evaluate it twice. Rows whose label was dropped carry the null class, so the
        conditional half of the doubled batch is ``u(z, a, a | labels)`` for every row."""
        options = self.guidance
        if not options.folded:
            return velocity, None
        with torch.no_grad():
            both = self.instantaneous_velocity(torch.cat([z, z]), torch.cat([a, a]),
                                               torch.cat([labels, null_labels(len(z), self.num_classes, z.device)]))
        conditional, unconditional = both.chunk(2)
        mixed = (options.scale * velocity + options.mix * conditional
                 + (1.0 - options.scale - options.mix) * unconditional)
        kept = broadcast_to(labels != self.num_classes, z)
        return torch.where(kept, mixed, velocity), conditional

    def training_loss(self, x1: Tensor, y: Tensor | None = None) -> Tensor:
        """The MeanFlow objective on a data batch ``x1: (B, *data_shape)`` (labels ``y: (B,)`` for a conditional
        model), drawing noise, intervals and label dropout from the global RNG."""
        labels = require_labels("MeanFlow", self.num_classes, y, x1.shape[0])
        x0 = torch.randn_like(x1)
        a, b = self.times(x1.shape[0], device=x1.device, dtype=x1.dtype)
        z, velocity = linear_path(x0, x1, a)
        own = None  # u(z, a, a | labels), where folded guidance already evaluated it
        if labels is not None:
            labels = drop_labels(labels, self.guidance.label_dropout, self.num_classes)
        if self.target_velocity == "batch":  # the intervals' v: the batch posterior's; b = a keeps x1 - x0
            marginal = batch_marginal_velocity(z, a, x1, labels, self.num_classes if labels is not None else None)
            velocity = torch.where(broadcast_to(b > a, z), marginal, velocity)
        if labels is not None:
            velocity, own = self._guided_velocity_and_own(z, a, velocity, labels)
        tangent = None
        if self.jvp_tangent == "model":
            tangent = own
            if tangent is None:
                with torch.no_grad():
                    tangent = self.instantaneous_velocity(z, a, labels)
        prediction, target = mean_flow_target(lambda z_, a_, b_: self.average_velocity(z_, a_, b_, labels),
                                              z, a, b, velocity, tangent)
        return adaptive_loss(prediction, target, self.loss_weighting)

    # ---- sampling ----
    def _requested_classes(self, n: int, y: Tensor | None, guidance: float) -> Tensor | None:
        if not self.is_conditional:
            if y is not None or guidance != 1.0:
                raise ValueError("MeanFlow is unconditional (num_classes=0): sample without y and with guidance=1.0, "
                                 "or train a conditional model (data.conditional: true).")
            return None
        return sampling_labels("MeanFlow", self.num_classes, y, n, self.device)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0, steps: int | None = None) -> Tensor:
        """``n`` samples ``(n, *data_shape)`` in ``steps`` jumps (default ``sampling.steps``), one network evaluation
        each; a conditional model draws class ``y[i]`` for row ``i`` (uniform classes when ``y`` is None)."""
        steps = self.sampling.steps if steps is None else MeanFlowSampling(steps).steps
        labels = self._requested_classes(n, y, guidance)
        z = torch.randn(n, *self.data_shape, device=self.device)
        grid = torch.linspace(0.0, 1.0, steps + 1, device=self.device).tolist()
        for a, b in zip(grid[:-1], grid[1:]):
            if labels is None:
                u = self.average_velocity(z, a, b)
            else:
                network = partial(self._jump, interval=b - a)
                u = guided(network, z, a, labels, guidance, self.num_classes)
            z = z + (b - a) * u
        self.last_sample_nfe = steps
        return z

    def sampling_variants(self) -> list[dict]:
        """The evaluator also measures the samples of the other one of 1 and 2 steps (MeanFlow's key limitation:
        the quality gap between them)."""
        return [{"steps": k} for k in (1, 2) if k != self.sampling.steps]

    # ---- likelihood of the instantaneous field ----
    @property
    def likelihood_kind(self) -> str:
        """``exact_instantaneous`` (exact trace) or ``estimate_instantaneous`` (Hutchinson): of the ODE of
        ``u(z, t, t)``, not of the few-step sampler."""
        return ("estimate" if self.likelihood_divergence == "hutchinson" else "exact") + "_instantaneous"

    def likelihood_traits(self) -> dict:
        """For the evaluator's labels: a density (exact trace) or an unbiased estimate of its log (Hutchinson) of
        the instantaneous field's ODE, a model of the data like flow matching's, named so in the table."""
        return {"exact_instantaneous": {"name": "exact, ODE of u(z, t, t)", "value": "exact",
                                        "unbiased_density": True},
                "estimate_instantaneous": {"name": "estimate, ODE of u(z, t, t)", "value": "estimate"}}

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x)`` in nats under the ODE ``dz/dt = u_theta(z, t, t)`` from ``N(0, I)`` at ``t = 0``,
        ``(B, *data_shape)`` -> ``(B,)``; with labels ``y: (B,)`` the conditional field's ``log p(x | y)``; a
        conditional model without labels scores its null-class field."""
        labels = None
        if y is not None:
            labels = check_labels("MeanFlow", self.num_classes, y, x.shape[0]).to(x.device)
        options = self.likelihood_ode
        result = ode_log_likelihood(lambda z, t: self.instantaneous_velocity(z, t, labels), x, options.solver,
                                    divergence=self.likelihood_divergence, chunk_size=options.trace_chunk_size)
        self.last_log_prob_nfe = result.nfe
        return result.log_prob


@contextmanager
def sampling_steps(model: MeanFlow, steps: int) -> Iterator[MeanFlow]:
    """Inside the block ``model.sample(n)`` jumps ``steps`` times (``steps`` NFE per sample), so an evaluator that calls
    ``sample(n)`` measures that step count: the knob of a sweep over NFE (as ``model.sampler`` is flow matching's).

    Example:
        >>> model = MeanFlow((2,), backbone={"kind": "mlp", "hidden": 8, "depth": 1})
        >>> with sampling_steps(model, 4):
        ...     _ = model.sample(3)
        >>> model.last_sample_nfe, model.sampling.steps
        (4, 1)
    """
    saved = model.sampling
    model.sampling = MeanFlowSampling(steps)
    try:
        yield model
    finally:
        model.sampling = saved
