"""The interface every generative family implements, so that one evaluation path serves all.

A family subclasses :class:`GenerativeModel`, declares ``likelihood`` (the lecture table's
"Likelihood" column), implements ``training_loss`` (its objective), ``sample`` and, where it has
one, ``log_prob``. Logging names are shared: ``train/loss``, ``val/loss``, ``test/loss``.
Everything is in *model space*; the DataModule maps to pixels and to bits/dim.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import lightning as L
import torch
from torch import Tensor

from lightning_flows.models.schedule import budget_progress, check_schedule, lr_factor
from lightning_flows.performance import logs_this_step

Likelihood = Literal["exact", "bound", "none"]


def split_batch(batch: Tensor | tuple[Tensor, Tensor] | list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """A DataModule batch -> ``(x, y)``: ``x: (B, *data_shape)`` and the labels ``y: (B,)`` (long) of a
    ``conditional: true`` DataModule, or ``None`` for an unlabelled batch ``x``."""
    if isinstance(batch, (tuple, list)):
        x, y = batch
        return x, y
    return batch, None


class GenerativeModel(L.LightningModule):
    """Base class of every family.

    Args:
        data_shape: shape of one example in model space, e.g. ``(2,)`` or ``(1, 8, 8)``; the CLI links
            it from the DataModule, so configs do not repeat it.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_schedule: ``constant`` or ``cosine`` (decays to 0 over the run's budget: max_steps, max_epochs
            or max_time, whichever binds first; see :mod:`lightning_flows.models.schedule`).
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).

    The optimisation recipe (``lr``, ``weight_decay``, ``lr_schedule``, ``warmup_steps``) has the same
    names in every family, so a suite can state it once; gradient clipping is the Trainer's
    ``gradient_clip_val`` and weight averaging the :class:`lightning_flows.callbacks.EMACallback`.
    """

    likelihood: Likelihood = "none"
    # Optimizer steps Lightning counts per training batch (a GAN steps two networks): a budget of
    # ``steps`` per network is ``max_steps = steps * optimizer_steps_per_batch``.
    optimizer_steps_per_batch: int = 1
    # The lecture's name for the family's objective (the comparison table's "Training objective").
    objective: str = ""

    def __init__(self, data_shape: Sequence[int] = (2,), lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0):
        super().__init__()
        check_schedule(lr_schedule, warmup_steps)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.lr, self.weight_decay = lr, weight_decay
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        # Cost of the most recent ``sample`` call: network evaluations (NFE) per sample.
        self.last_sample_nfe: int | None = None

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    @property
    def is_conditional(self) -> bool:
        """Whether the model was built with classes (``num_classes > 0``, linked from a ``conditional: true``
        DataModule): it then trains on ``(x, y)`` batches and ``sample(n, y)`` draws the requested classes."""
        return getattr(self, "num_classes", 0) > 0

    # ---- what a family implements ----
    def training_loss(self, x: Tensor) -> Tensor:
        """Scalar objective on a batch ``x: (B, *data_shape)`` in model space."""
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        """``n`` samples in model space, ``(n, *data_shape)``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """``x: (B, *data_shape)`` -> ``(B,)`` log-density in nats (exact or a lower bound)."""
        raise NotImplementedError(f"{type(self).__name__} has likelihood='{self.likelihood}' and no log_prob.")

    def sampling_ode(self) -> tuple[Callable[[Tensor, Tensor], Tensor], float, float] | None:
        """The ODE ``sample`` integrates from standard-normal noise, as ``(field f(x, t), t0, t1)``; None for a
        family that does not sample by an ODE. The evaluator measures the straightness of its paths."""
        return None

    def sampling_variants(self) -> list[dict]:
        """Other settings of ``sample`` (its keyword arguments) whose sample quality the evaluator also reports,
        each under its measured NFE (``fid_nfe<k>``, ``energy_distance_nfe<k>``): a family whose key trade-off is
        a sampling choice (MeanFlow: 1 vs 2 steps) shows it in the table. None by default."""
        return []

    @property
    def likelihood_kind(self) -> str:
        """What ``log_prob`` returns: ``exact``, ``bound``, ``estimate`` (an unbiased estimate of the exact
        value, e.g. with Hutchinson's trace) or ``none``."""
        return self.likelihood

    def likelihood_estimators(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Every log-likelihood the family can report, by kind (see :attr:`likelihood_kind`):
        ``{kind: x -> (B,) nats in model space}``. The evaluator reports each; a family with more than
        one (e.g. a bound and an exact ODE likelihood) overrides this."""
        return {} if self.likelihood == "none" else {self.likelihood_kind: self.log_prob}

    # ---- shared Lightning plumbing ----
    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"{type(self).__name__} was built for examples of shape {self.data_shape} but got "
                             f"a batch of shape {tuple(x.shape)}; check that the model and data configs agree.")

    def _step(self, batch: Tensor | tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = split_batch(batch)
        self._check_input(x)
        if y is not None and not self.is_conditional:
            raise ValueError(f"{type(self).__name__} is unconditional (num_classes=0) but got a labelled (x, y) batch "
                             f"from a `data.conditional: true` DataModule; use the family's conditional config "
                             f"(experiments/<dataset>/<family>_conditional.yaml) or set data.conditional: false.")
        # Unconditional families keep their one-argument objective; a labelled batch reaches only a
        # family built with classes (``num_classes > 0``, linked from a ``conditional: true`` DataModule).
        loss = self.training_loss(x) if y is None else self.training_loss(x, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", sync_dist=stage != "train",
                 batch_size=x.shape[0])
        return loss

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def log(self, name: str, value, *args, **kwargs) -> None:
        """``LightningModule.log``, except that an on-step value logged in ``training_step`` is not recorded
        on the steps whose on-step values the logger never writes (:func:`~lightning_flows.performance.
        logs_this_step`): Lightning would drop it anyway, and recording it costs ~0.1 ms of bookkeeping per
        call, several percent of a small model's step. The progress bar and ``trainer.callback_metrics``
        show the most recently recorded value. Epoch-aggregated values (``on_epoch=True``) are always kept."""
        if (self._current_fx_name == "training_step" and kwargs.get("on_step") is not False
                and kwargs.get("on_epoch") is not True and not logs_this_step(self._trainer)):
            return
        super().log(name, value, *args, **kwargs)

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        return self.scheduled(torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay))

    # ---- the learning-rate schedule ----
    def scheduled(self, *optimizers: torch.optim.Optimizer):
        """``optimizers`` with the configured schedule attached, as ``configure_optimizers`` returns them.

        Without a schedule (constant, no warm-up) the optimizers are returned unchanged. With manual
        optimisation the family steps the schedulers itself (:meth:`step_lr_schedulers`).
        """
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        steps_per_batch = 1 if self.automatic_optimization else len(optimizers)

        def factor(step: int) -> float:
            attached = self._trainer is not None and self.lr_schedule != "constant"
            progress = budget_progress(self._trainer, step, steps_per_batch) if attached else 0.0
            return lr_factor(self.lr_schedule, self.warmup_steps, step, progress)

        return [{"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                     "interval": "step"}} for opt in optimizers]

    def step_lr_schedulers(self) -> None:
        """Manual optimisation only: advance every scheduler by one step (call after the optimizers step)."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `lightning-flows sample --ckpt` rebuild the right class without a config file.
        # Only a name: loading looks it up in a fixed table of our families and never imports it.
        checkpoint["lightning_flows_model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
