"""Flow matching: the lecture's definition by default, with the field's couplings, paths and samplers as options.

Training (the lecture): ``x0 ~ N(0, I)`` drawn independently of ``x1 ~ data``, ``t ~ U[0, 1]``,
``x_t = (1 - t) x0 + t x1``, and the network ``f_theta(x_t, t)`` regresses the path velocity
``x1 - x0`` (the minimiser is ``E[x1 - x0 | x_t = x]``, the marginal field).
Options (:mod:`lightning_flows.flow_matching`): minibatch-OT or reflow couplings, a Gaussian path of
width ``sigma`` around the straight line, logit-normal times.
Sampling: solve ``dx/dt = f_theta(x, t)`` from ``t = 0`` (noise) to ``t = 1`` (data).
Likelihood: the learned field is a CNF, so ``log_prob`` is exact through the shared
:func:`lightning_flows.ode.ode_log_likelihood` (data integrated back to noise with the trace term).

Class-conditional (``num_classes > 0``, linked from a ``conditional: true`` DataModule): the field is
``f_theta(x, t, y)``, labels are dropped to a learned null class with probability ``label_dropout`` during
training, and ``sample(n, y, guidance=w)`` integrates the classifier-free guided field
``f(x, t, null) + w (f(x, t, y) - f(x, t, null))`` (:mod:`lightning_flows.nn.class_conditioning`, one network
call per step on the doubled batch). ``log_prob(x, y)`` is the exact ``log p(x | y)`` of the conditional
field (w = 1); ``log_prob(x)`` without labels is the exact log-density of the *null-class* field, the
unconditional model learnt through label dropout (not the mixture of the conditional fields).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from lightning_flows.flow_matching import (
    COUPLINGS, BackgroundBatches, FlowMatchingBatch, IndependentCoupling, MinibatchOTCoupling, PairedCoupling,
    TimeSampler, TrainingBatchDraw, generate_reflow_pairs, linear_path, load_teacher,
)
from lightning_flows.models.base import GenerativeModel
from lightning_flows.nn import make_time_backbone
from lightning_flows.conditioning import check_labels, check_num_classes, require_labels, sampling_labels
from lightning_flows.nn.class_conditioning import drop_labels, guided
from lightning_flows.ode import SolverConfig, as_solver_config, integrate, ode_log_likelihood

__all__ = ["FlowMatching", "linear_path"]

LIKELIHOOD_DIVERGENCES = ("auto", "exact", "hutchinson")


class FlowMatching(GenerativeModel):
    """Conditional flow matching on the linear path, with a choice of coupling.

    Args:
        backbone: ``auto`` (UNet for images, MLP for vectors), ``mlp`` or ``unet``.
        hidden, depth, activation: MLP width, number of hidden layers and activation.
        base_channels, channel_mults: UNet widths.
        sampler: ODE solver used by ``sample`` (method, steps or tolerances, NFE cap).
        likelihood_solver: ODE solver of the exact ``log_prob`` (default dopri5, rtol = atol = 1e-5).
        likelihood_divergence: ``exact`` trace (D backward passes per evaluation), ``hutchinson`` (one; an
            unbiased estimate of the same log-likelihood, reported as ``estimate``) or ``auto``: exact up to
            ``exact_likelihood_max_dim`` dimensions, Hutchinson above.
        exact_likelihood_max_dim: ``auto``'s threshold. Measured (experiments/PERFORMANCE.md): per example and
            ODE evaluation the exact trace costs 14x Hutchinson at D = 64 (8x8 digits), 186x at D = 256 and
            ~900x at D = 784, i.e. days of CPU for an MNIST test split; so exact for toy 2D and 8x8 digits.
        trace_chunk_size: Jacobian rows the exact trace computes at once (memory ``~ chunk * B * D``; the
            ``D x D`` Jacobian is never formed), as the CNF's ``trace_chunk_size``.
        coupling: how noise is paired with data: ``independent`` (the lecture), ``ot`` (minibatch exact optimal
            transport) or ``reflow`` (pairs ``(x0, ODE(x0))`` of the teacher ``teacher_ckpt``).
        sigma: width of the Gaussian path around the straight line (0: the lecture's path).
        time_sampling: ``uniform`` (the lecture) or ``logit_normal`` with ``time_mean`` / ``time_std``.
        ot_block_size: ``ot`` pairs exactly within consecutive blocks of this many examples (null: the whole
            batch at once; ``O(B^3)``, tens of milliseconds at B = 512 on a CPU).
        pairing_threads: background threads preparing (pairing) the next training batches while the current
            one trains; 0 pairs inside the training step. Used by ``ot`` and ``reflow`` when trained by a
            Trainer with :class:`~lightning_flows.data.GenerativeDataModule`. One thread pairs a 512 batch in
            blocks of 64 in ~2 ms of CPU; use more when a training step is faster than that (small models on a
            GPU). The pairing is hidden only where a CPU core is idle: on a saturated CPU it adds its CPU time
            (then a smaller ``ot_block_size``, e.g. 32, halves that cost).
        teacher_ckpt: ``reflow``'s teacher, a flow-matching checkpoint (EMA weights when the run kept them).
        reflow_pairs: how many teacher pairs to generate when fit/validate/test starts (split across DDP ranks).
        reflow_solver: the teacher's ODE solver for the pairs (default: the teacher's own sampler).
        reflow_seed: seed of the pairs' noise; a seed fixes the pairs.
        num_classes: classes of the labels (linked from a ``conditional: true`` DataModule); 0 = unconditional.
        label_dropout: probability that a training label is replaced by the null class (classifier-free
            guidance needs the unconditional branch it trains); used when ``num_classes > 0``.
    """

    likelihood = "exact"
    objective = "Supervised learning of velocities"

    def __init__(self, data_shape: Sequence[int] = (2,), backbone: str = "auto", hidden: int = 256,
                 depth: int = 3, activation: str = "silu", base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), sampler: SolverConfig | dict | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_steps: int = 0,
                 likelihood_solver: SolverConfig | dict | None = None, likelihood_divergence: str = "auto",
                 exact_likelihood_max_dim: int = 64, trace_chunk_size: int | None = 64,
                 coupling: str = "independent", sigma: float = 0.0, time_sampling: str = "uniform",
                 time_mean: float = 0.0, time_std: float = 1.0, ot_block_size: int | None = 64,
                 pairing_threads: int = 1, teacher_ckpt: str | None = None, reflow_pairs: int = 20_000,
                 reflow_solver: SolverConfig | dict | None = None, reflow_seed: int = 0, num_classes: int = 0,
                 label_dropout: float = 0.1):
        super().__init__(data_shape, lr, weight_decay, lr_schedule, warmup_steps)
        self.save_hyperparameters()
        num_classes = check_num_classes(num_classes)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}.")
        if num_classes and coupling == "reflow":
            raise ValueError("coupling 'reflow' trains on an unconditional teacher's pairs, whose x1 carry no "
                             "labels; class-conditional flow matching supports coupling 'independent' or 'ot'.")
        self.num_classes, self.label_dropout = num_classes, label_dropout
        if coupling not in COUPLINGS:
            raise ValueError(f"Unknown coupling '{coupling}'. Choose one of: {', '.join(COUPLINGS)}.")
        if coupling == "reflow" and not teacher_ckpt:
            raise ValueError("coupling 'reflow' needs teacher_ckpt: the checkpoint of a trained flow-matching model "
                             "whose ODE generates the training pairs.")
        if pairing_threads < 0:
            raise ValueError(f"pairing_threads must be >= 0 (0 = pair inside the training step), got "
                             f"{pairing_threads}.")
        self.coupling_name, self.sigma, self.pairing_threads = coupling, sigma, pairing_threads
        self.reflow_solver = None if reflow_solver is None else as_solver_config(reflow_solver)
        self.time_sampler = TimeSampler(time_sampling, time_mean, time_std)
        coupling_fn = MinibatchOTCoupling(ot_block_size) if coupling == "ot" else IndependentCoupling()
        # reflow's coupling needs the teacher's pairs; they are generated in ``setup`` (see ``_prepare_reflow``).
        self.draw_batch = TrainingBatchDraw(coupling_fn, self.time_sampler, sigma)
        self.sampler = as_solver_config(sampler)
        self.likelihood_solver = as_solver_config(
            likelihood_solver or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5})
        if likelihood_divergence not in LIKELIHOOD_DIVERGENCES:
            raise ValueError(f"likelihood_divergence must be 'auto', 'exact' or 'hutchinson', got "
                             f"'{likelihood_divergence}'.")
        if trace_chunk_size is not None and trace_chunk_size < 1:
            raise ValueError(f"trace_chunk_size must be >= 1 (or null: all rows at once), got {trace_chunk_size}.")
        if likelihood_divergence == "auto":  # resolved once, so likelihood_kind and log_prob always agree
            likelihood_divergence = "exact" if self.dim <= exact_likelihood_max_dim else "hutchinson"
        self.likelihood_divergence, self.trace_chunk_size = likelihood_divergence, trace_chunk_size
        self.last_log_prob_nfe: int | None = None
        self.velocity = make_time_backbone(self.data_shape, backbone, hidden=hidden, depth=depth,
                                           base_channels=base_channels, channel_mults=channel_mults,
                                           activation=activation, num_classes=num_classes)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """The learned field ``f_theta(x, t[, y])``: ``(B, *data_shape)`` -> same shape (y None: null class)."""
        return self.velocity(x, t) if y is None else self.velocity(x, t, y)

    # ---- training ----
    def regression_loss(self, batch: FlowMatchingBatch) -> Tensor:
        """``E |f_theta(x_t, t[, y]) - (x1 - x0)|^2`` on a prepared batch (all its randomness already drawn;
        only the label dropout of a conditional model draws here, from the global RNG)."""
        xt, target = linear_path(batch.x0, batch.x1, batch.t, self.sigma, batch.path_noise)
        y = require_labels("FlowMatching", self.num_classes, batch.y, batch.x1.shape[0])
        if y is None:
            return (self.velocity(xt, batch.t) - target).pow(2).mean()
        y = drop_labels(y, self.label_dropout, self.num_classes)
        return (self.velocity(xt, batch.t, y) - target).pow(2).mean()

    def training_loss(self, x1: Tensor, y: Tensor | None = None) -> Tensor:
        """The objective on a data batch ``x1: (B, *data_shape)`` (labels ``y: (B,)`` for a conditional model),
        drawing (and pairing) from the global RNG."""
        self._require_reflow_pairs()
        return self.regression_loss(self.draw_batch(x1 if y is None else (x1, y)))

    def training_step(self, batch: Tensor | FlowMatchingBatch, batch_idx: int) -> Tensor:
        if not isinstance(batch, FlowMatchingBatch):  # a plain data batch: draw inside the step
            return super().training_step(batch, batch_idx)
        self._check_input(batch.x1)
        loss = self.regression_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.x1.shape[0])
        return loss

    def train_batch_stage(self, loader: Iterable, seed: int) -> Iterable:
        """Hook of :meth:`GenerativeDataModule.train_dataloader`: the stage after the data loader.

        ``ot`` and ``reflow`` draw and pair each batch in :class:`BackgroundBatches`, ahead of the step, with
        per-batch generators from ``(seed, epoch, rank, batch)``; ``independent`` keeps the plain loader
        (its draw costs nothing, and it keeps the lecture's behaviour of drawing inside the step).
        """
        if self.coupling_name == "independent":
            return loader
        self._require_reflow_pairs()
        return BackgroundBatches(loader, self.draw_batch, seed, threads=self.pairing_threads)

    def setup(self, stage: str) -> None:
        # Validation and test losses of a reflow model are its objective on the teacher's pairs, too.
        if stage in ("fit", "validate", "test") and self.coupling_name == "reflow":
            self._prepare_reflow()

    def _prepare_reflow(self) -> None:
        """Generate this rank's teacher pairs (deterministic for ``reflow_seed`` and the number of ranks)."""
        if isinstance(self.draw_batch.coupling, PairedCoupling):
            return
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # setup runs before the strategy moves this model to its device; generate where training will run.
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        teacher = load_teacher(self.hparams.teacher_ckpt, self.data_shape, device=device)
        solver = self.reflow_solver or teacher.sampler
        x0, x1 = generate_reflow_pairs(teacher.velocity, self.data_shape, self.hparams.reflow_pairs, solver,
                                       seed=self.hparams.reflow_seed, rank=rank, world_size=world, device=device)
        self.draw_batch.coupling = PairedCoupling(x0, x1)

    def _require_reflow_pairs(self) -> None:
        if self.coupling_name == "reflow" and not isinstance(self.draw_batch.coupling, PairedCoupling):
            raise RuntimeError("coupling 'reflow' trains on the teacher's pairs, generated by "
                               "FlowMatching.setup('fit') (a Trainer calls it); call it first when training "
                               "without a Trainer.")

    # ---- sampling and likelihood ----
    def guided_field(self, y: Tensor, guidance: float = 1.0):
        """The classifier-free guided field ``(x, t) -> f(x, t, null) + w (f(x, t, y) - f(x, t, null))`` for
        fixed labels ``y: (B,)`` (one network call per evaluation)."""
        return lambda x, t: guided(self.velocity, x, t, y, guidance, self.num_classes)

    def _requested_classes(self, n: int, y: Tensor | None, guidance: float) -> Tensor | None:
        """Checked labels for a conditional model (uniform classes when ``y`` is None), None otherwise."""
        if not self.is_conditional:
            if y is not None or guidance != 1.0:
                raise ValueError(f"{type(self).__name__} is unconditional (num_classes=0): sample without y and with "
                                 f"guidance=1.0, or train a conditional model (data.conditional: true).")
            return None
        return sampling_labels("FlowMatching", self.num_classes, y, n, self.device)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 1.0,
               solver: SolverConfig | None = None) -> Tensor:
        """``n`` samples ``(n, *data_shape)``; a conditional model draws class ``y[i]`` for sample ``i`` (uniform
        classes when ``y`` is None) with guidance weight ``guidance``."""
        labels = self._requested_classes(n, y, guidance)
        x0 = torch.randn(n, *self.data_shape, device=self.device)
        field = self.velocity if labels is None else self.guided_field(labels, guidance)
        solution = integrate(field, x0, solver or self.sampler, 0.0, 1.0)
        self.last_sample_nfe = solution.nfe
        return solution.states

    def sampling_ode(self):
        """The unconditional sampling ODE (a conditional model's null-class field)."""
        return self.velocity, 0.0, 1.0

    @property
    def likelihood_kind(self) -> str:
        return "estimate" if self.likelihood_divergence == "hutchinson" else "exact"

    def log_prob(self, x: Tensor, y: Tensor | None = None, solver: SolverConfig | None = None) -> Tensor:
        """``log p(x)`` in nats of the model's ODE, ``(B, *data_shape)`` -> ``(B,)``; with labels ``y: (B,)``
        the exact ``log p(x | y)`` of the conditional field. Without labels a conditional model scores its
        null-class (unconditional) field.

        Exact trace (``trace_chunk_size`` rows at a time), or Hutchinson's unbiased estimate of it
        (``likelihood_divergence``; :attr:`likelihood_kind` says which).
        """
        field = self.velocity
        if y is not None:
            if not self.is_conditional:
                raise ValueError(f"{type(self).__name__} is unconditional (num_classes=0); call log_prob(x) "
                                 f"without labels.")
            labels = check_labels("FlowMatching", self.num_classes, y, x.shape[0]).to(x.device)
            field = lambda z, t: self.velocity(z, t, labels)  # noqa: E731
        result = ode_log_likelihood(field, x, solver or self.likelihood_solver,
                                    divergence=self.likelihood_divergence, chunk_size=self.trace_chunk_size)
        self.last_log_prob_nfe = result.nfe
        return result.log_prob
