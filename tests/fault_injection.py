"""Callbacks that inject faults into real CLI runs (tests put this directory on PYTHONPATH).

Used as ``--trainer.callbacks+=fault_injection.<Name> --trainer.callbacks.<arg> <value>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch


class PauseAtStep(L.Callback):
    """After the training batch that reaches ``step``, write ``marker`` and sleep (so a test can kill us there)."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0):
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(self.seconds)


class RaiseAtStep(L.Callback):
    """Raise on global rank ``rank`` when training reaches ``step`` (the other ranks carry on into DDP).

    With ``marker``, first write the wall-clock time of the failure there.
    """

    def __init__(self, step: int, rank: int = 1, marker: str | None = None):
        self.step, self.rank, self.marker = step, rank, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.marker:
                Path(self.marker).write_text(repr(time.time()))
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


class DumpWeights(L.Callback):
    """At the end of training every rank writes ``out/rank<global rank>.pt``: its weights and where it stopped."""

    def __init__(self, out: str):
        self.out, self.init = out, None

    def on_fit_start(self, trainer, pl_module):
        self.init = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        Path(self.out).mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": pl_module.state_dict(), "init": self.init, "global_step": trainer.global_step,
                    "world_size": trainer.world_size, "node_rank": trainer.node_rank},
                   Path(self.out) / f"rank{trainer.global_rank}.pt")


class SlowDownFromStep(L.Callback):
    """From global step ``step`` on, write ``marker`` and sleep ``seconds`` after every batch.

    Slow enough for a test to send a signal while training runs, without pausing it forever.
    """

    def __init__(self, step: int, marker: str, seconds: float = 0.2):
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            if trainer.global_step == self.step and trainer.is_global_zero:
                Path(self.marker).write_text(str(os.getpid()))
            time.sleep(self.seconds)


class NaNGradients(L.Callback):
    """From global step ``step`` on, every gradient is NaN (a diverging run, as the non-finite guard sees it)."""

    def __init__(self, step: int = 0):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step >= self.step:
            for parameter in pl_module.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))
