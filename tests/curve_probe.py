"""A test-only callback for real benchmark runs with an evaluation schedule (tests put this directory on
PYTHONPATH): ``--trainer.callbacks+={"class_path": "curve_probe.RecordCurve", "init_args": {"directory": ...}}``.

At each step the run's :class:`~lightning_flows.callbacks.EvaluationSchedule` evaluates, every rank saves a
checkpoint of that moment (``<Family>_step<s>.ckpt``, written by rank zero: Lightning's collective save, so a test
can evaluate those weights again in one process), and at the end of training each rank writes the points its
schedule holds (``<Family>_rank<r>.json``): the curve rank zero publishes and what the other ranks computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from lightning_flows.callbacks import EvaluationSchedule


class RecordCurve(L.Callback):
    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.saved: set[int] = set()

    @staticmethod
    def _schedule(trainer) -> EvaluationSchedule:
        return next(c for c in trainer.callbacks if isinstance(c, EvaluationSchedule))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step // pl_module.optimizer_steps_per_batch
        if step in self._schedule(trainer).schedule and step not in self.saved:
            self.saved.add(step)
            trainer.save_checkpoint(self.directory / f"{type(pl_module).__name__}_step{step}.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{type(pl_module).__name__}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world": trainer.world_size, "points": self._schedule(trainer).points}))
