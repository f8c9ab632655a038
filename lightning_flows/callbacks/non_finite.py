"""A guard that keeps NaN/inf out of the weights, for every family.

Each optimizer step is checked just before it happens (``on_before_optimizer_step``, after backward
and before gradient clipping): the step is *skipped* when the loss seen by the last backward was
non-finite or any gradient of that optimizer's parameters is. Skipping means setting those
gradients to ``None``: every torch optimizer leaves a parameter without a gradient untouched (no
Adam moment update, no weight decay), so a bad batch changes no weight and no optimizer state.

Under DDP the decision is all-reduced (any rank bad -> every rank skips), so ranks never diverge.
After ``max_consecutive`` skipped steps in a row training stops (``trainer.should_stop``) with a
clear message; since no bad update ever reached the weights, every checkpoint written so far -- and
the one Lightning may write on stopping -- holds finite, last-good weights.

Manual optimisation (e.g. GANs calling ``self.manual_backward`` and ``opt.step()``) goes through the
same Lightning hooks (``manual_backward`` runs ``on_before_backward``; ``LightningOptimizer.step``
runs ``on_before_optimizer_step``), so each of the optimizers is guarded separately; a step count
there is per optimizer step, not per batch.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def gradients_finite(parameters) -> bool:
    """True when every existing gradient among ``parameters`` is finite (one device sync)."""
    flags = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps whose loss or gradients are NaN/inf; stop after too many in a row.

    Args:
        max_consecutive: stop training after this many consecutive skipped steps (``0``: never stop).
        log_name: the metric counting skipped steps so far.
    """

    def __init__(self, max_consecutive: int = 10, log_name: str = "train/skipped_steps"):
        super().__init__()
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}.")
        self.max_consecutive, self.log_name = max_consecutive, log_name
        self.skipped_steps = 0
        self.consecutive = 0
        self.stop_reason: str | None = None
        self._loss_finite = True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        bad = not (self._loss_finite and gradients_finite(params))
        self._loss_finite = True
        # Any rank bad -> all skip; otherwise DDP replicas would hold different weights.
        bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive and not trainer.should_stop:
            self.stop_reason = (
                f"NonFiniteGuard: {self.consecutive} consecutive optimizer steps had a NaN/inf loss or gradient "
                f"(global step {trainer.global_step}); stopping. No bad update reached the weights, so the last "
                f"checkpoint is intact. Lower the learning rate, enable gradient clipping "
                f"(--trainer.gradient_clip_val) or check the data for NaN/inf.")
            rank_zero_warn(self.stop_reason)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        pl_module.log(self.log_name, float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive = state_dict.get("consecutive", 0)
