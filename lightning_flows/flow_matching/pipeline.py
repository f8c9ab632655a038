"""A data-pipeline stage that prepares training batches in background threads, ahead of the step.

Minibatch OT pairing costs milliseconds per batch (an assignment problem); done inside the training
step it divides the throughput (torchcfm's OT-CFM: ~8x slower). Here it is computed for the *next*
batches while the current one trains: scipy's ``linear_sum_assignment`` and torch's distance
kernels release the GIL, so a thread runs them in parallel with the step's forward/backward.

Reproducibility: every batch ``i`` of epoch ``e`` on rank ``r`` gets its own generator seeded from
``(seed, e, r, i)``. The output therefore does not depend on the number of threads or on thread
timing, and it differs between DDP ranks (each rank draws its own noise for its own data shard).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

# Distinguishes these generators from any other stream derived from the same data seed.
_STREAM = 0x666D


def process_rank() -> int:
    """This process's rank under ``torch.distributed`` (0 when not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def batch_generator(seed: int, epoch: int, rank: int, index: int) -> torch.Generator:
    """A CPU generator for one batch, well mixed from ``(seed, epoch, rank, index)``."""
    state = np.random.SeedSequence([_STREAM, seed, epoch, rank, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class BackgroundBatches:
    """Iterate ``fn(batch, generator)`` over ``loader``'s batches, computed ``prefetch`` batches ahead.

    Args:
        loader: an iterable of batches with ``len`` (e.g. :class:`lightning_flows.data.loader.InMemoryBatches`);
            when it exposes an ``epoch`` counter, the generators follow it (so a resumed loader resumes the noise).
        fn: ``(batch, generator) -> prepared batch``; must not touch model parameters (it runs off the
            training thread).
        seed: base seed of the per-batch generators.
        threads: worker threads; ``0`` computes ``fn`` inline, on the training step's path (the peers' way).
        prefetch: batches prepared ahead of the one being trained (default ``2 * threads``).
    """

    def __init__(self, loader: Iterable, fn: Callable[[Any, torch.Generator], Any], seed: int = 0,
                 threads: int = 1, prefetch: int | None = None):
        if threads < 0:
            raise ValueError(f"pairing_threads must be >= 0 (0 = inline), got {threads}.")
        self.loader, self.fn, self.seed, self.threads = loader, fn, seed, threads
        self.prefetch = max(1, 2 * threads if prefetch is None else prefetch)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.loader, "epoch", self.epoch)  # read before the loader's own iteration bumps it
        self.epoch = epoch + 1
        rank = process_rank()
        jobs = ((batch, batch_generator(self.seed, epoch, rank, i)) for i, batch in enumerate(self.loader))
        if self.threads == 0:
            for batch, generator in jobs:
                yield self.fn(batch, generator)
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batch-prep")
        pending: deque = deque()
        try:
            for batch, generator in jobs:
                pending.append(pool.submit(self.fn, batch, generator))
                if len(pending) > self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # Also runs when the trainer stops mid-epoch (max_steps) and drops this iterator.
            pool.shutdown(wait=False, cancel_futures=True)
