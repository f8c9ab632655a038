"""Drawing evaluation samples: identical for any number of DDP ranks, timed, gathered in one order.

The ``n`` samples are cut into chunks of ``chunk_size``; chunk ``i`` is always drawn with the seed
``chunk_seed(seed, i)`` and chunks are dealt round-robin to ranks. The union over ranks is therefore
the set one process draws, and :func:`gather_chunks` reassembles it in chunk order on every rank, so
any metric of the whole set (FID, KID subsets, precision/recall) equals the single-process value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flows.metrics.distributed import gather_objects
from lightning_flows.metrics.sampling_cost import SamplingCost, timed_sample

Chunk = tuple[int, Tensor]  # (chunk index, tensor of that chunk)


def chunk_seed(seed: int, chunk_index: int) -> int:
    """The RNG seed of chunk ``chunk_index`` (independent of rank and world size)."""
    return seed * 1_000_003 + chunk_index


def rank_chunks(n: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """``(chunk_index, chunk_length)`` pairs that rank ``rank`` of ``world`` draws."""
    if n < 1 or chunk_size < 1:
        raise ValueError(f"n and chunk_size must be >= 1, got n={n}, chunk_size={chunk_size}")
    n_chunks = -(-n // chunk_size)
    return [(i, min(chunk_size, n - i * chunk_size)) for i in range(rank, n_chunks, world)]


def _cuda_devices(model) -> list[int]:
    device = model.device
    return [device.index or 0] if device.type == "cuda" else []


def sample_kwargs(labels: Tensor | None, start: int, length: int, guidance: float) -> dict:
    """What ``model.sample`` takes besides ``n`` for samples ``start .. start + length`` of a draw: the requested
    classes ``labels[start:start + length]`` (if any) and a guidance weight other than 1; nothing for a plain draw."""
    kwargs: dict = {} if labels is None else {"y": labels[start:start + length]}
    if guidance != 1.0:
        kwargs["guidance"] = guidance
    return kwargs


def warm_up(model, n: int, labels: Tensor | None = None, guidance: float = 1.0) -> None:
    """One untimed ``sample`` call (lazy initialisation, allocator, kernel selection) that leaves the
    caller's random state untouched; a conditional draw warms up with its labels and guidance."""
    n = max(1, n)
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.inference_mode():
        model.sample(n, **sample_kwargs(None if labels is None else labels[:n], 0, n, guidance))


def generate_chunks(model, n: int, chunk_size: int, seed: int, rank: int, world: int,
                    cost: SamplingCost | None = None, progress=None, labels: Tensor | None = None,
                    guidance: float = 1.0, options: dict | None = None) -> list[Chunk]:
    """This rank's chunks of the ``n`` samples, in model space, each timed into ``cost``.

    ``labels: (n,)``: the class each sample is drawn for (a conditional model), drawn with ``guidance``;
    sample ``j`` is always drawn for ``labels[j]``, whichever rank draws its chunk. ``options``: further keyword
    arguments of ``model.sample`` (a sampling variant, :meth:`GenerativeModel.sampling_variants`).

    Sampling runs under ``fork_rng``, so training randomness is untouched by evaluation, and under
    ``torch.inference_mode`` (no autograd bookkeeping at all; a chunk at a time bounds the memory).
    ``progress``: an optional tqdm bar advanced by the samples drawn.
    """
    cost = cost if cost is not None else SamplingCost()
    chunks: list[Chunk] = []
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.inference_mode():
        for index, length in rank_chunks(n, chunk_size, rank, world):
            torch.manual_seed(chunk_seed(seed, index))
            extra = {**sample_kwargs(labels, index * chunk_size, length, guidance), **(options or {})}
            chunks.append((index, timed_sample(model, length, cost, model.device, **extra)))
            if progress is not None:
                progress.update(length)
    return chunks


def gather_chunks(chunks: list[Chunk]) -> Tensor:
    """All ranks' chunks concatenated in chunk order, on the CPU, on every rank (a collective)."""
    everything = [c for rank_chunks_ in gather_objects([(i, t.detach().cpu()) for i, t in chunks])
                  for c in rank_chunks_]
    if not everything:
        raise ValueError("No samples were drawn on any rank.")
    return torch.cat([t for _, t in sorted(everything, key=lambda c: c[0])])
