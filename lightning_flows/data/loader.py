"""Batches sliced from tensors already in memory, sharded across DDP ranks.

A torch ``DataLoader`` over a ``TensorDataset`` calls ``__getitem__`` once per example and collates
in Python; for datasets that fit in memory that overhead dominates a small model's step. This
iterable indexes the whole batch at once. Sharding follows ``torch.distributed`` when it is
initialised, so each rank sees its own part of every epoch and every rank yields the same number
of batches (a rank that runs out early would deadlock DDP's gradient all-reduce).

The iterable is *resumable*: ``state_dict()`` records the epoch and how many batches of it were
handed out, Lightning stores that in every checkpoint (it does so for any loader with
``state_dict``/``load_state_dict``), and after ``load_state_dict`` the next iteration continues that
epoch at that batch, with the same order and the same per-batch noise as an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of one epoch's per-batch noise on one rank (every training loader draws from it)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 64 + rank)


class InMemoryBatches:
    """Iterate over ``transform(data[idx], generator)`` for batches of indices ``idx``, or over
    ``(transform(data[idx], generator), labels[idx])`` when ``labels`` are given.

    Args:
        data: ``(N, ...)`` tensor holding the whole split.
        labels: ``(N,)`` class labels of ``data`` (same order), or None for unlabelled batches.
        batch_size: examples per batch on each rank.
        transform: ``(raw_batch, indices, generator) -> batch``, e.g. dequantisation.
        shuffle: reshuffle every epoch (training). Evaluation order is fixed.
        drop_last: drop the incomplete last batch (training); evaluation keeps every example
            exactly once across ranks, in equally many (possibly uneven) batches per rank.
        seed: shuffling and per-batch noise derive from ``(seed, epoch, rank)``.

    ``epoch`` counts the iterations started so far; ``position`` the batches handed out in the
    current one.
    """

    def __init__(self, data: Tensor, batch_size: int, transform: Callable[[Tensor, Tensor, torch.Generator], Tensor],
                 shuffle: bool, drop_last: bool, seed: int = 0, labels: Tensor | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"labels must hold one label per example: {len(labels)} labels for {len(data)} examples.")
        self.labels = labels
        self.data, self.batch_size, self.transform = data, batch_size, transform
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0
        self.position = 0
        self._resume_at: tuple[int, int] | None = None

    def _rank_indices(self, epoch: int) -> tuple[Tensor, int]:
        rank, world = _rank_and_world()
        n = len(self.data)
        if self.shuffle:
            # Same permutation on every rank (same seed), then each rank takes its stride.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        else:
            order = torch.arange(n)
        if self.drop_last:
            per_rank = n // world
            return order[rank * per_rank:(rank + 1) * per_rank], per_rank
        return order[rank::world], math.ceil(n / world)

    def __len__(self) -> int:
        _, world = _rank_and_world()
        n = len(self.data)
        if self.drop_last:
            return (n // world) // self.batch_size
        return math.ceil(math.ceil(n / world) / self.batch_size)

    def state_dict(self) -> dict:
        """Where iteration stands: the current epoch and the batches of it already handed out."""
        return {"epoch": max(self.epoch - 1, 0), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Make the next iteration continue ``state``'s epoch after its ``position`` batches."""
        self._resume_at = (int(state["epoch"]), int(state["position"]))

    def _batch(self, idx: Tensor, generator: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        x = self.transform(self.data[idx], idx, generator)
        return x if self.labels is None else (x, self.labels[idx])

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        rank, _ = _rank_and_world()
        epoch, skip = self.epoch, 0
        if self._resume_at is not None:
            epoch, skip = self._resume_at
            self._resume_at = None
            if skip >= len(self):  # saved at the very end of an epoch: the next one starts afresh
                epoch, skip = epoch + 1, 0
        self.position = 0
        indices, _ = self._rank_indices(epoch)
        n_batches = len(self)
        if self.drop_last:
            chunks = indices[: n_batches * self.batch_size].split(self.batch_size)
        else:
            # tensor_split keeps the batch count equal on every rank without padding or repeats.
            chunks = torch.tensor_split(indices, n_batches) if n_batches > 0 else ()
        generator = epoch_generator(self.seed, epoch, rank)
        self.epoch = epoch + 1
        for i, idx in enumerate(chunks):
            if i < skip:
                # Replay the skipped batches' noise so the generator is where it was in the
                # interrupted run; only the random draws are repeated, not the model's work.
                self.transform(self.data[idx], idx, generator)
                continue
            self.position = i + 1
            yield self._batch(idx, generator)
