"""Continuous normalizing flow (FFJORD-style), trained by exact maximum likelihood through the ODE.

``dz/dt = f_theta(z, t)`` carries ``N(0, I)`` at ``t = 0`` to the data at ``t = 1``. Training
maximises ``log p(x)`` from :func:`lightning_flows.ode.ode_log_likelihood` (the augmented ODE
``d/dt [z, log p] = [f, -Tr(df/dz)]`` solved from data back to noise), optionally plus RNODE's
kinetic-energy and Jacobian-Frobenius penalties that keep the learned dynamics easy to solve.

As in FFJORD, training and evaluation use separate solver settings: training may use a cheap
fixed-step solver and Hutchinson's trace; evaluation (``log_prob``, ``val/loss``, ``test/loss``) uses
``test_solver`` with the exact trace, so the reported NLL is an exact likelihood of the model.

Class-conditional (``num_classes = K > 0``, issue 21), conditioned the way the discrete flows are: the label shifts
every layer of the field, ``f(z, t, y)`` (:class:`~lightning_flows.nn.ode_functions.ConcatSquashMLP` or
:class:`~lightning_flows.nn.ode_functions.ConcatConvField`), over a
learned per-class Gaussian base (:class:`~lightning_flows.flows.ClassConditionalNormal`). Training maximises the
exact ``log p(x | y)``; ``log_prob(x, y)`` is exact and ``log_prob(x)`` the exact marginal
``logsumexp_y [log p(x | y) + log p(y)]`` with the uniform class prior: one ODE solve of the ``K`` classes batched
together (``K`` times the rows), so bits/dim stays comparable with unconditional models. No classifier-free
guidance (``guidance`` must stay 1).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lightning_flows.conditioning import (check_labels, check_no_guidance, check_num_classes, log_prob_every_class,
                                          marginalise_classes, require_labels, sampling_labels)
from lightning_flows.flows.actnorm import ActNorm
from lightning_flows.flows.distribution import MARGINAL_ROWS_PER_PASS, ClassConditionalNormal
from lightning_flows.flows.preprocess import preprocessing_layers
from lightning_flows.models.base import GenerativeModel, split_batch
from lightning_flows.nn.ode_functions import (BoundField, ConcatConvField, ConcatSquashMLP, ConvPlusMLPField,
                                              LabelledField)
from lightning_flows.ode import (
    DIVERGENCE_KINDS, PROBE_KINDS, SolverConfig, as_solver_config, integrate, ode_log_likelihood,
)
from lightning_flows.ode.likelihood import standard_normal_log_prob

FIELDS = ("auto", "mlp", "conv", "conv_mlp")


def make_ode_field(data_shape: Sequence[int], field: str, hidden: int, depth: int, channels: int,
                   activation: str, num_classes: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """``auto`` picks the conv field for images ``(C, H, W)`` and the MLP for vectors; ``num_classes > 0`` gives
    the class-conditional field, ``dropout > 0`` the MLP field with per-solve dropout."""
    if field not in FIELDS:
        raise ValueError(f"Unknown CNF field '{field}'. Choose one of: {', '.join(FIELDS)}.")
    if field == "auto":
        field = "conv" if len(data_shape) == 3 else "mlp"
    if field in ("conv", "conv_mlp") and dropout:
        raise ValueError("CNF dropout is implemented for the MLP field only; set model.field: mlp or "
                         "model.dropout: 0.")
    if field == "conv_mlp":
        return ConvPlusMLPField(data_shape, channels=channels, hidden=hidden, depth=depth, activation=activation,
                                num_classes=num_classes)
    if field == "conv":
        return ConcatConvField(data_shape, channels=channels, depth=depth, activation=activation,
                               num_classes=num_classes)
    return ConcatSquashMLP(data_shape, hidden=hidden, depth=depth, activation=activation, num_classes=num_classes,
                           dropout=dropout)


class CNF(GenerativeModel):
    """FFJORD-style CNF with an exact likelihood.

    Args:
        field: ``auto`` (conv for images, MLP for vectors), ``mlp``, ``conv`` or ``conv_mlp`` (their sum, images).
        hidden, depth, channels, activation: field width (MLP), hidden layers, conv channels and a
            smooth activation (``softplus`` or ``tanh``).
        train_solver: solver of the training likelihood (keep it fixed-step or capped: backprop
            through an adaptive solve stores every step; ``adjoint: true`` keeps memory flat).
        test_solver: solver of ``log_prob`` / validation / test (FFJORD: dopri5, 1e-5).
        sampler: solver of ``sample``.
        train_divergence, test_divergence: ``exact`` or ``hutchinson``.
        probe: Hutchinson probe, ``rademacher`` or ``gaussian`` (drawn once per solve).
        kinetic_weight, jacobian_weight: RNODE weights on ``int ||f||^2 dt`` and ``int ||df/dz||_F^2 dt``.
        trace_chunk_size: bound on simultaneous Jacobian products of the exact trace (memory).
        preprocess: ``none``, ``logit`` (FFJORD on images: the ODE runs in logit space; its log-det is part
            of ``log_prob``) or ``auto`` (logit for images); ``logit_alpha`` keeps the edges finite.
        normalize: put an ActNorm (per-dimension affine, initialised from the first training batch to zero
            mean and unit variance, then learned) between the data (after ``preprocess``) and the ODE, so the
            field need not spend its flow on the data's scale; its log-det joins ``log_prob``.
        num_classes: classes ``K`` of the class-conditional CNF (0: unconditional); linked from the DataModule by
            the CLI (``data.conditional: true``), never written in a config.
        dropout: share of the MLP field's hidden units dropped in each training solve (0: off), a regulariser
            for small datasets. The masks are drawn once per solve and per example, so every training example
            still follows one exact ODE (that of its sub-network); ``log_prob`` and ``sample`` use the full field.
    """

    likelihood = "exact"
    objective = "Exact MLE via ODE + trace"

    def __init__(self, data_shape: Sequence[int] = (2,), field: str = "auto", hidden: int = 64, depth: int = 3,
                 channels: int = 32, activation: str = "softplus",
                 train_solver: SolverConfig | dict | None = None, test_solver: SolverConfig | dict | None = None,
                 sampler: SolverConfig | dict | None = None, train_divergence: str = "exact",
                 test_divergence: str = "exact", probe: str = "rademacher", kinetic_weight: float = 0.0,
                 jacobian_weight: float = 0.0, trace_chunk_size: int | None = None, preprocess: str = "none",
                 logit_alpha: float = 0.05, normalize: bool = False, lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0, num_classes: int = 0, dropout: float = 0.0):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.num_classes = check_num_classes(num_classes)
        for name, value in (("train_divergence", train_divergence), ("test_divergence", test_divergence)):
            if value not in DIVERGENCE_KINDS:
                raise ValueError(f"Unknown {name} '{value}'. Choose one of: {', '.join(DIVERGENCE_KINDS)}.")
        if probe not in PROBE_KINDS:
            raise ValueError(f"Unknown probe '{probe}'. Choose one of: {', '.join(PROBE_KINDS)}.")
        if kinetic_weight < 0 or jacobian_weight < 0:
            raise ValueError("kinetic_weight and jacobian_weight must be >= 0 (they are penalties).")
        self.train_solver = as_solver_config(train_solver or {"method": "rk4", "steps": 8, "max_nfe": 400})
        self.test_solver = as_solver_config(test_solver or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5,
                                                            "max_nfe": 5000})
        self.sampler = as_solver_config(sampler or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5,
                                                    "max_nfe": 5000})
        self.train_divergence, self.test_divergence, self.probe = train_divergence, test_divergence, probe
        self.kinetic_weight, self.jacobian_weight = kinetic_weight, jacobian_weight
        self.trace_chunk_size = trace_chunk_size
        self.field = make_ode_field(self.data_shape, field, hidden, depth, channels, activation, self.num_classes,
                                    dropout)
        # FFJORD models images in logit space (as RealNVP does): the ODE runs on z = logit(x); the
        # preprocessing's log-det joins log p, so log_prob stays a density in model space.
        (self.preprocess,) = preprocessing_layers(preprocess, self.data_shape, logit_alpha) or (None,)
        self.normalizer = ActNorm(self.dim) if normalize else None
        # Zero-initialised: every class starts as the standard normal (no random draws).
        self.class_base = ClassConditionalNormal(self.data_shape, self.num_classes) if self.num_classes else None
        self.last_log_prob_nfe: int | None = None

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The velocity ``f_theta(x, t)``: ``(B, *data_shape)`` -> same shape."""
        return self.field(x, t)

    def _bound(self, y: Tensor | None, masks: list[Tensor] | None = None) -> torch.nn.Module:
        """The field as ``f(x, t)`` with labels ``y: (B,)`` and/or dropout masks fixed for one solve (the MLP field
        keeps its closed-form divergence; the conv field has no dropout)."""
        if isinstance(self.field, ConcatSquashMLP):
            return BoundField(self.field, y, masks)
        return LabelledField(self.field, y)

    def _labelled(self, y: Tensor | None, masks: list[Tensor] | None = None) -> tuple[torch.nn.Module, object]:
        """The field and base log-density of ``log p(. | y)`` for labels ``y: (B,)``, or the unconditional ones;
        ``masks``: one training solve's dropout masks."""
        field = self.field if y is None and masks is None else self._bound(y, masks)
        if y is None:
            return field, standard_normal_log_prob
        return field, lambda z: self.class_base.log_prob(z, y)

    def training_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Mean NLL in nats, ``-log p(x)`` or (conditional) ``-log p(x | y)`` (training solver and divergence),
        plus the weighted RNODE penalties."""
        y = require_labels("CNF", self.num_classes, y, x.shape[0])
        z, log_det = self._to_ode_space(x)
        # Like nn.Dropout, only in training mode; the conv field has no dropout (make_ode_field refuses it).
        masks = self.field.draw_dropout_masks(z.shape[0], z) if self.training and self.hparams.dropout else None
        field, base_log_prob = self._labelled(y, masks)
        result = ode_log_likelihood(field, z, self.train_solver, divergence=self.train_divergence,
                                    probe=self.probe, kinetic_energy=self.kinetic_weight > 0,
                                    jacobian_frobenius=self.jacobian_weight > 0, base_log_prob=base_log_prob,
                                    chunk_size=self.trace_chunk_size)
        nll = -(result.log_prob + log_det).mean()
        loss = nll
        if result.kinetic_energy is not None:
            loss = loss + self.kinetic_weight * result.kinetic_energy.mean()
            self._log_train("train/kinetic_energy", result.kinetic_energy.mean())
        if result.jacobian_frobenius is not None:
            loss = loss + self.jacobian_weight * result.jacobian_frobenius.mean()
            self._log_train("train/jacobian_frobenius", result.jacobian_frobenius.mean())
        self._log_train("train/nll", nll)
        self._log_train("train/nfe", float(result.nfe))
        return loss

    def _log_train(self, name: str, value: Tensor | float) -> None:
        if self._trainer is not None and self.training:
            self.log(name, value)

    @property
    def likelihood_solver(self) -> SolverConfig:
        """The exact likelihood's solver (``test_solver``) under the name flow matching and diffusion give theirs, so
        tools that vary it (experiments/benchmarks/likelihood_tolerance.py) treat every ODE family alike."""
        return self.test_solver

    @likelihood_solver.setter
    def likelihood_solver(self, solver: SolverConfig | dict) -> None:
        self.test_solver = as_solver_config(solver)

    @property
    def likelihood_kind(self) -> str:
        return "estimate" if self.test_divergence == "hutchinson" else "exact"

    def log_prob(self, x: Tensor, y: Tensor | None = None, solver: SolverConfig | None = None,
                 divergence: str | None = None) -> Tensor:
        """Exact ``log p(x)`` in nats (test solver, exact trace by default): ``(B, *data_shape)`` -> ``(B,)``.

        With labels ``y: (B,)`` (a conditional model) the exact ``log p(x | y)``; a conditional model without labels
        returns the exact marginal over its classes."""
        if y is not None:
            y = check_labels("CNF", self.num_classes, y, x.shape[0]).to(x.device)
        elif self.num_classes:
            return marginalise_classes(self.log_prob_every_class(x, solver, divergence))
        z, log_det = self._to_ode_space(x)
        field, base_log_prob = self._labelled(y)
        result = ode_log_likelihood(field, z, solver or self.test_solver,
                                    divergence=divergence or self.test_divergence, probe=self.probe,
                                    base_log_prob=base_log_prob, chunk_size=self.trace_chunk_size)
        self.last_log_prob_nfe = result.nfe
        return result.log_prob + log_det

    def log_prob_every_class(self, x: Tensor, solver: SolverConfig | None = None,
                             divergence: str | None = None) -> Tensor:
        """``log p(x | y = k)`` for every class ``k``: ``(B, *data_shape)`` -> ``(B, K)`` nats. The classes run as
        one solve of ``K * B`` rows (in passes of at most ``MARGINAL_ROWS_PER_PASS`` rows)."""
        if not self.num_classes:
            raise ValueError("this CNF is unconditional (num_classes=0): it has no per-class densities.")
        nfe = 0

        def log_prob_given(rows: Tensor, labels: Tensor) -> Tensor:
            nonlocal nfe
            log_p = self.log_prob(rows, labels, solver, divergence)
            nfe += self.last_log_prob_nfe  # every pass's solve counts
            return log_p

        every_class = log_prob_every_class(log_prob_given, x, self.num_classes, MARGINAL_ROWS_PER_PASS)
        self.last_log_prob_nfe = nfe
        return every_class

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0,
               solver: SolverConfig | None = None) -> Tensor:
        """Integrate base noise from ``t = 0`` to ``t = 1``: ``(n, *data_shape)`` in model space. A conditional
        model draws class ``y[i]`` for sample ``i`` (uniform classes when ``y`` is None); ``guidance`` must be 1."""
        check_no_guidance("CNF", guidance)
        labels = sampling_labels("CNF", self.num_classes, y, n, self.device)
        if labels is None:
            z0, field = torch.randn(n, *self.data_shape, device=self.device), self.field
        else:
            z0, field = self.class_base.sample(labels), self._bound(labels)
        solution = integrate(field, z0, solver or self.sampler, 0.0, 1.0)
        self.last_sample_nfe = solution.nfe
        z = solution.states
        if self.normalizer is not None:
            z = self.normalizer.inverse(z.flatten(1)).reshape(z.shape)
        return z if self.preprocess is None else self.preprocess.inverse(z)

    def _to_ode_space(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        """Model space -> the ODE's space and ``log|det dz/dx|`` per example ``(B,)`` (0 without preprocessing)."""
        z, log_det = (x, 0.0) if self.preprocess is None else self.preprocess(x)
        if self.normalizer is not None:
            flat, normalizer_log_det = self.normalizer(z.flatten(1))
            z, log_det = flat.reshape(z.shape), log_det + normalizer_log_det
        return z, log_det

    def sampling_ode(self):
        # In the ODE's space (logit space with `preprocess: logit`). A conditional CNF has no label-free field
        # (no null class), so there is no one sampling ODE whose paths to measure.
        return None if self.num_classes else (self.field, 0.0, 1.0)

    # Validation and test report the exact NLL (the family's own objective without the training
    # approximations), so val/loss is comparable across runs with different training solvers.
    # A conditional model reports the marginal -log p(x) (comparable with unconditional models) and, beside it,
    # -log p(x | y) as nll_given_class, from one solve of every class.
    def _step(self, batch: Tensor | tuple[Tensor, Tensor], stage: str) -> Tensor:
        if stage == "train":
            return super()._step(batch, stage)
        x, y = split_batch(batch)
        self._check_input(x)
        y = require_labels("CNF", self.num_classes, y, x.shape[0])
        size = x.shape[0]
        if y is None:
            nll = -self.log_prob(x).mean()
        else:
            every_class = self.log_prob_every_class(x)
            self.log(f"{stage}/nll_given_class", -every_class.gather(1, y[:, None].to(x.device)).mean(),
                     sync_dist=True, batch_size=size)
            nll = -marginalise_classes(every_class).mean()
        self.log(f"{stage}/loss", nll, sync_dist=True, batch_size=size)
        self.log(f"{stage}/nfe", float(self.last_log_prob_nfe), sync_dist=True, batch_size=size)
        return nll
