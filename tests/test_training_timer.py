"""TrainingTimer: ``seconds`` covers the steps alone, ``loop_seconds`` also the data pipeline in between."""

from __future__ import annotations

import time

import lightning as L
import torch

from lightning_flows.callbacks import TrainingTimer
from lightning_flows.models import FlowMatching

FETCH_SECONDS = 0.05


class SlowBatches:
    """A loader whose every batch takes ``FETCH_SECONDS`` to produce (like a pairing stage that cannot keep up)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            time.sleep(FETCH_SECONDS)
            yield torch.randn(16, 2)


def test_loop_clock_includes_fetching_and_skips_epoch_boundaries():
    torch.manual_seed(0)
    timer = TrainingTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(FlowMatching(data_shape=(2,), hidden=8, depth=1), train_dataloaders=SlowBatches(4))
    assert timer.batches == 8 and timer.examples == 8 * 16
    assert timer.loop_batches == 6  # 3 batch-to-batch intervals per epoch
    # Each interval holds one fetch; the in-step clock holds none.
    assert timer.loop_seconds >= timer.loop_batches * FETCH_SECONDS
    assert timer.seconds < timer.batches * FETCH_SECONDS
    restored = TrainingTimer()
    restored.load_state_dict(timer.state_dict())
    assert (restored.loop_seconds, restored.loop_batches) == (timer.loop_seconds, timer.loop_batches)
