"""Draw ``n`` evaluation samples split across DDP ranks, identical for any number of ranks.

The ``n`` samples are cut into fixed chunks of ``chunk_size``; chunk ``i`` is always drawn with the
seed ``chunk_seed(seed, i)`` and chunks are dealt round-robin to ranks. So rank ``r`` of ``W``
draws about ``n / W`` samples, and the union over ranks is the same set of samples a single
process draws: a metric summed over ranks equals the single-process value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flows.metrics.sampling_cost import SamplingCost, timed_sample


def chunk_seed(seed: int, chunk_index: int) -> int:
    """The RNG seed of chunk ``chunk_index`` (independent of rank and world size)."""
    return seed * 1_000_003 + chunk_index


def rank_chunks(n: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """``(chunk_index, chunk_length)`` pairs that rank ``rank`` of ``world`` draws."""
    if n < 1 or chunk_size < 1:
        raise ValueError(f"n and chunk_size must be >= 1, got n={n}, chunk_size={chunk_size}")
    n_chunks = -(-n // chunk_size)
    return [(i, min(chunk_size, n - i * chunk_size)) for i in range(rank, n_chunks, world)]


def generate_rank_share(model, n: int, chunk_size: int, seed: int, rank: int, world: int,
                        cost: SamplingCost | None = None) -> Tensor:
    """This rank's share of the ``n`` samples, in model space: ``(m, *data_shape)``, ``m ~ n / world``.

    Sampling runs under ``fork_rng`` so training randomness is untouched by evaluation. A rank whose
    share is empty returns a ``(0, *data_shape)`` tensor.
    """
    device = model.device
    devices = [device.index or 0] if device.type == "cuda" else []
    cost = cost if cost is not None else SamplingCost()
    parts = []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for index, length in rank_chunks(n, chunk_size, rank, world):
            torch.manual_seed(chunk_seed(seed, index))
            parts.append(timed_sample(model, length, cost, device))
    if not parts:
        return torch.zeros(0, *model.data_shape, device=device)
    return torch.cat(parts)
