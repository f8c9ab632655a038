"""Training wall time alone: the time spent inside training batches (forward, backward, optimizer step),
excluding start-up, validation, sample grids and checkpointing.

No device synchronisation per batch (it would stall a GPU's queue); the clock is synchronised once at
the end of training, so on a GPU the sum is exact up to the kernels still queued at the last batch.

``seconds`` starts at the batch hook, after the batch was fetched, so it leaves out the data pipeline
(e.g. the minibatch-OT pairing a background stage prepares). ``loop_seconds`` is the pipeline-inclusive
clock: the time between consecutive batch starts within an epoch (one step plus fetching one batch),
over ``loop_batches`` such intervals; ``loop_batches / loop_seconds`` is the steady-state steps/s.
"""

from __future__ import annotations

import time

import lightning as L
import torch


class TrainingTimer(L.Callback):
    """Accumulates ``seconds`` in training batches, ``batches`` and ``examples`` (on this rank), and
    ``loop_seconds`` over ``loop_batches`` batch-start-to-batch-start intervals (data pipeline included)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.batches = 0
        self.examples = 0
        self.loop_seconds = 0.0
        self.loop_batches = 0
        self._start: float | None = None
        self._previous: tuple[int, float] | None = None  # (batch_idx, start) of the epoch's last batch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._previous = None  # the first interval of an epoch would include the epoch boundary

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._previous is not None and self._previous[0] == batch_idx - 1:
            self.loop_seconds += self._start - self._previous[1]
            self.loop_batches += 1
        self._previous = (batch_idx, self._start)

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
        return {"seconds": self.seconds, "batches": self.batches, "examples": self.examples,
                "loop_seconds": self.loop_seconds, "loop_batches": self.loop_batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = state_dict.get("seconds", 0.0)
        self.batches = state_dict.get("batches", 0)
        self.examples = state_dict.get("examples", 0)
        self.loop_seconds = state_dict.get("loop_seconds", 0.0)
        self.loop_batches = state_dict.get("loop_batches", 0)
