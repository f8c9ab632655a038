"""DDP replicas that end training identical, buffers included.

DDP keeps *parameters* identical by all-reducing gradients, but *buffers* (batch norm's running
statistics, spectral norm's power-iteration vectors) are only broadcast from rank 0 at the start of
each forward pass; every rank then updates its own copy. After the last step each rank therefore
holds slightly different buffers, and anything run on every rank after ``fit`` (``trainer.test``,
a sharded evaluation, a sample grid) would mix them. Rank 0's are the ones DDP treats as the truth
and the ones its checkpoint saves, so :class:`SyncBuffersAtFitEnd` copies them to every rank.
"""

from __future__ import annotations

import lightning as L
import torch


class SyncBuffersAtFitEnd(L.Callback):
    """At the end of training, broadcast every buffer of the model from global rank 0."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        with torch.no_grad():
            for buffer in pl_module.buffers():
                torch.distributed.broadcast(buffer, src=0)
