"""Exponential moving average (EMA) of a model's weights, for any family.

After every batch in which the optimizers stepped (once per batch for the GAN, whose two optimizers
each step once; not on gradient-accumulation batches): ``ema <- d_n * ema + (1 - d_n) * theta`` for
every parameter and floating-point buffer (integer buffers such as BatchNorm's batch counter are
copied), with the warmed-up decay ``d_n = min(decay, (1 + n) / (10 + n))`` at update ``n = 0, 1, ...``.
The warm-up stops the average from dragging the random initial weights along: with a fixed 0.999
they would still weigh ``0.999^n`` (37% after 1000 updates); with the warm-up they weigh
``prod_k d_k``, under 1% after 10 updates.

The warm-up also makes the average relative to the run's length: while ``(1 + n) / (10 + n) < decay`` the
parameters of update ``k`` weigh about ``k^8`` (a power-function EMA, Karras et al. 2024), so half of the average
is the last ``1 - 0.5^(1/9) = 7.4%`` of the updates and the current decay halves a weight in ``ln 2 / 9 = 7.7%``
of the updates so far, at any budget. ``decay`` only caps that half-life at ``ln 2 / (1 - decay)`` updates (138
for 0.995, 693 for 0.999, 6,931 for 0.9999, reached after ~1,800, ~9,000 and ~90,000 updates): 0.999 and 0.9999
are the same average on runs of a few thousand steps. On digits flow matching a half-life of a fixed 20% of the
run was no better than this rule (quick budget, 2 seeds: FID 29.7 +- 0.3 against 28.4 +- 1.7;
``experiments/benchmarks/recipe_sweep.py``, table in ``experiments/results/recipe/``).

(Lightning's ``EMAWeightAveraging`` only swaps for
validation and stores the average as the checkpoint's ``state_dict``; this callback also serves
test/predict and keeps the ``ema_state_dict`` layout that :mod:`lightning_flows.checkpoints` reads.)

The EMA weights are swapped into the model for validation, testing and prediction, which includes
every sample drawn by callbacks during validation (sample grids, FID), and swapped back before
training resumes. When ``fit`` ends the model keeps the EMA weights (what a user evaluates or samples
after training, as Lightning's own weight averaging does); a further ``fit`` swaps the training
weights back in first. The EMA state is saved in checkpoints (callback state, for resuming) and, for
loading a model for sampling, as a complete model state dict under ``checkpoint["ema_state_dict"]``;
the checkpoint's ``state_dict`` always holds the *training* weights.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn


def model_state(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (the tensors themselves, not copies)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def warmed_up_decay(decay: float, n: int) -> float:
    """The decay of update ``n`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + n) / (10.0 + n))


@torch.no_grad()
def ema_update(shadow: dict[str, Tensor], current: dict[str, Tensor], decay: float) -> None:
    """In place: ``shadow <- decay * shadow + (1 - decay) * current`` (floats); integers are copied."""
    for name, value in current.items():
        if value.is_floating_point():
            shadow[name].lerp_(value.detach().to(shadow[name].dtype), 1.0 - decay)
        else:
            shadow[name].copy_(value)


class EMACallback(L.Callback):
    """Keep an EMA of the weights and evaluate / sample with it.

    Args:
        decay: per-update decay once warmed up (0.999 is about a 1000-step window).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (off: ``decay`` from the start).
        start_step: updates begin at this global step; before it the EMA copies the weights.
        every_n_steps: update every ``n`` optimizer-stepping batches (decay applies per update).
        use_for_eval: swap the EMA weights in for validation, test and predict.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, start_step: int = 0, every_n_steps: int = 1,
                 use_for_eval: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.decay, self.warmup, self.start_step, self.every_n_steps = decay, warmup, start_step, every_n_steps
        self.use_for_eval = use_for_eval
        self.shadow: dict[str, Tensor] | None = None
        self.num_updates = 0
        self._batches_seen = 0  # batches in which the optimizers stepped
        self._last_global_step = -1
        self._training_weights: dict[str, Tensor] | None = None  # held while EMA weights are swapped in
        self._held_after_fit = False  # the EMA weights stay in the model between fits
        self._loaded_shadow: dict[str, Tensor] | None = None

    # ---- bookkeeping ----
    def _init_shadow(self, pl_module: L.LightningModule) -> None:
        current = model_state(pl_module)
        if self._loaded_shadow is not None:
            self.shadow = {k: v.to(current[k].device) for k, v in self._loaded_shadow.items()}
            self._loaded_shadow = None
        else:
            self.shadow = {k: v.detach().clone() for k, v in current.items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return warmed_up_decay(self.decay, self.num_updates) if self.warmup else self.decay

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._held_after_fit:  # a second fit continues from the training weights
            self._held_after_fit = False
            self.swap_out(pl_module)
        if self.shadow is None:
            self._init_shadow(pl_module)
        self._last_global_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_global_step:
            return  # no optimizer stepped (a gradient-accumulation batch)
        self._last_global_step = trainer.global_step
        self._batches_seen += 1
        if self._batches_seen % self.every_n_steps:
            return
        if trainer.global_step <= self.start_step:
            self.shadow = {k: v.detach().clone() for k, v in model_state(pl_module).items()}
            return
        ema_update(self.shadow, model_state(pl_module), self.current_decay())
        self.num_updates += 1

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.use_for_eval:
            self.swap_in(pl_module)
            self._held_after_fit = self._training_weights is not None

    # ---- swapping the EMA weights in for evaluation ----
    @property
    def swapped_in(self) -> bool:
        """True while the model holds the EMA weights (between ``swap_in`` and ``swap_out``)."""
        return self._training_weights is not None

    @torch.no_grad()
    def swap_in(self, pl_module: L.LightningModule) -> None:
        """Load the EMA weights into the model, keeping the training weights aside."""
        if self.shadow is None or self._training_weights is not None:
            return
        current = model_state(pl_module)
        self._training_weights = {k: v.detach().clone() for k, v in current.items()}
        for name, value in current.items():
            value.copy_(self.shadow[name])

    @torch.no_grad()
    def swap_out(self, pl_module: L.LightningModule) -> None:
        """Put the training weights back."""
        self._held_after_fit = False
        if self._training_weights is None:
            return
        for name, value in model_state(pl_module).items():
            value.copy_(self._training_weights[name])
        self._training_weights = None

    def _eval_start(self, trainer, pl_module) -> None:
        if self.shadow is None and self._loaded_shadow is not None:
            self._init_shadow(pl_module)  # `validate`/`test` from a checkpoint: no fit to start from
        if self.use_for_eval:
            self.swap_in(pl_module)

    def _eval_end(self, pl_module) -> None:
        if not self._held_after_fit:  # after fit the EMA weights stay in (see the module docstring)
            self.swap_out(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._eval_end(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_end(pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._eval_end(pl_module)

    # ---- checkpoints ----
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        prefix_state = pl_module.state_dict()
        if self._training_weights is not None:
            # Saved mid-validation (e.g. by ModelCheckpoint): keep `state_dict` the training weights.
            checkpoint["state_dict"] = {k: self._training_weights.get(k, v).clone() for k, v in prefix_state.items()}
        if self.shadow is not None:
            checkpoint["ema_state_dict"] = {k: self.shadow.get(k, v).detach().clone()
                                            for k, v in prefix_state.items()}

    def state_dict(self) -> dict:
        shadow = None if self.shadow is None else {k: v.detach().cpu().clone() for k, v in self.shadow.items()}
        return {"decay": self.decay, "num_updates": self.num_updates, "batches_seen": self._batches_seen,
                "shadow": shadow}

    def load_state_dict(self, state_dict: dict) -> None:
        self.num_updates = state_dict.get("num_updates", 0)
        self._batches_seen = state_dict.get("batches_seen", 0)
        self._loaded_shadow = state_dict.get("shadow")
        self.shadow = None
