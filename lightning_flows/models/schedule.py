"""Learning-rate schedules that follow the run's budget, stepped once per optimizer step.

A schedule is a factor on the base learning rate: a linear warm-up over ``warmup_steps`` optimizer
steps, times the decay (``constant``: 1; ``cosine``: ``(1 + cos(pi p)) / 2``), where ``p`` in [0, 1]
is the fraction of the training budget used so far. The budget is whichever of the Trainer's limits
binds first: ``max_steps``, ``max_epochs`` (both in optimizer steps) or ``max_time`` (elapsed
fraction), so a cosine reaches zero exactly when a time-budgeted run stops, however fast the machine.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Timer

LR_SCHEDULES = ("constant", "cosine")


def check_schedule(lr_schedule: str, warmup_steps: int) -> None:
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr_schedule '{lr_schedule}'. Choose one of: {', '.join(LR_SCHEDULES)}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")


def lr_factor(lr_schedule: str, warmup_steps: int, step: int, progress: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) over the base rate, at budget fraction ``progress``."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if lr_schedule == "constant":
        return warmup
    return warmup * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def step_budget(trainer: L.Trainer, optimizer_steps_per_batch: int = 1) -> float:
    """Optimizer steps (of one optimizer) that ``max_steps`` / ``max_epochs`` allow; ``inf`` if neither is set.

    ``trainer.global_step`` (what ``max_steps`` limits) counts the steps of every optimizer, so with
    manual optimisation and ``k`` optimizers each stepping once per batch (the GAN), ``max_steps``
    allows ``max_steps / k`` steps of each.
    """
    try:
        budget = float(trainer.estimated_stepping_batches)
    except Exception:  # e.g. max_epochs unset on a bare Trainer: no epoch budget to read
        budget = math.inf
    if trainer.max_steps != -1:
        budget = min(budget, trainer.max_steps / optimizer_steps_per_batch)
    return budget


def time_fraction(trainer: L.Trainer) -> float | None:
    """Fraction of ``max_time`` spent training so far, or None without a time limit.

    Under DDP every rank takes rank 0's value: clocks differ by milliseconds, and ranks that stepped
    with different learning rates would drift apart (Lightning's Timer broadcasts its stop decision
    for the same reason).
    """
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        return None
    elapsed = timer.time_elapsed()
    fraction = elapsed / max(elapsed + remaining, 1e-9)
    return trainer.strategy.broadcast(fraction, src=0) if trainer.world_size > 1 else fraction


def budget_progress(trainer: L.Trainer, step: int, optimizer_steps_per_batch: int = 1) -> float:
    """Fraction of the binding budget used after ``step`` optimizer steps; errors if the run has no budget."""
    steps = step_budget(trainer, optimizer_steps_per_batch)
    elapsed = time_fraction(trainer)
    if math.isinf(steps) and elapsed is None:
        raise ValueError("lr_schedule='cosine' decays over the training budget, but this run has none: set "
                         "trainer.max_steps, trainer.max_epochs or trainer.max_time.")
    return max(step / steps if steps > 0 else 1.0, elapsed or 0.0)


__all__ = ["LR_SCHEDULES", "budget_progress", "check_schedule", "lr_factor", "step_budget", "time_fraction"]
