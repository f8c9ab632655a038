"""DDP replicas that end training identical, and a job whose processes live and die together.

*Buffers.* DDP keeps *parameters* identical by all-reducing gradients, but *buffers* (batch norm's
running statistics, spectral norm's power-iteration vectors) are only broadcast from rank 0 at the
start of each forward pass; every rank then updates its own copy. After the last step each rank
therefore holds slightly different buffers, and anything run on every rank after ``fit``
(``trainer.test``, a sharded evaluation) would mix them. Rank 0's are the ones DDP treats as the
truth and the ones its checkpoint saves, so they are copied to every rank when training ends.

*Failures.* When one rank raises, the others are left blocked in their next collective. Lightning's
launcher already watches the ranks it started and kills everything when one of them dies; but when
the launching process itself (rank 0 of the node) raises, it exits and leaves its child ranks
behind, waiting for a peer that will never answer (with NCCL, until a 10-30 minute timeout). The
launching process therefore kills the ranks it started before it re-raises, so the whole job exits
non-zero at once.
"""

from __future__ import annotations

import signal

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


class DistributedReplicas(L.Callback):
    """Broadcast every buffer from global rank 0 at the end of training; on a crash, take down our child ranks."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        with torch.no_grad():
            for buffer in pl_module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.world_size < 2 or isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # a stop every rank takes together (or Lightning's own Ctrl-C handling)
        launcher = trainer.strategy.launcher
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signal.SIGKILL)  # blocked in a collective, SIGTERM would not get through
