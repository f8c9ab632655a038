"""Training wall time alone: the time spent inside training batches (forward, backward, optimizer step),
excluding start-up, validation, sample grids and checkpointing.

No device synchronisation per batch (it would stall a GPU's queue); the clock is synchronised once at
the end of training, so on a GPU the sum is exact up to the kernels still queued at the last batch.
"""

from __future__ import annotations

import time

import lightning as L
import torch


class TrainingTimer(L.Callback):
    """Accumulates ``seconds`` in training batches, ``batches`` and ``examples`` (on this rank)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.batches = 0
        self.examples = 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        self.seconds += time.perf_counter() - self._start
        self._start = None
        self.batches += 1
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.examples += int(first.shape[0])

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            start = time.perf_counter()
            torch.cuda.synchronize(pl_module.device)
            self.seconds += time.perf_counter() - start

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "batches": self.batches, "examples": self.examples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = state_dict.get("seconds", 0.0)
        self.batches = state_dict.get("batches", 0)
        self.examples = state_dict.get("examples", 0)
