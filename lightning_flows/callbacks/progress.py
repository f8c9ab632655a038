"""Lightning's TQDM progress bar, redrawn by the clock instead of at every training step.

Lightning's default bar redraws and re-reads the logged metrics after every training batch
(``refresh_rate=1``). Reading them converts each logged tensor with ``.item()``: on a GPU that waits
for the device once per step, and on a CPU the redraw alone costs a few tenths of a millisecond, which
is several percent of a small model's step. This bar does nothing on most steps (one clock read) and
redraws, metrics included, at most every ``min_interval`` seconds and at the end of each epoch.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


class IntervalProgressBar(TQDMProgressBar):
    """A :class:`TQDMProgressBar` whose training bar redraws at most every ``min_interval`` seconds.

    Args:
        min_interval: seconds between redraws of the training bar (its last batch always redraws).
        leave: keep each epoch's finished bar on screen.
    """

    def __init__(self, min_interval: float = 0.5, leave: bool = False):
        super().__init__(refresh_rate=1, leave=leave)
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0 seconds, got {min_interval}.")
        self.min_interval = min_interval
        self._last_draw = float("-inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self.is_enabled:
            return
        n = batch_idx + 1
        now = time.monotonic()
        if now - self._last_draw < self.min_interval and n != bar.total:
            return
        self._last_draw = now
        bar.n = n
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()
