"""The few collective operations the evaluation path needs, usable with or without a Trainer.

Every function here is a no-op in a single process and a collective under ``torch.distributed``:
*every* rank must call it, in the same order. That is why no evaluation metric may be computed in
a rank-zero-only hook (torchmetrics #2684): the other ranks would never join and rank zero hangs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_across_ranks(tensor: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Elementwise sum of ``tensor`` over all ranks, returned on the CPU.

    ``device`` is where the collective runs: NCCL only reduces CUDA tensors, gloo CPU ones, so
    pass the module's device.
    """
    if not is_distributed():
        return tensor.detach().clone().cpu()
    reduced = tensor.detach().clone().to(device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced.cpu()


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` holds on every rank (e.g. "my cache file exists"), so all ranks take the
    same branch and reach the same collectives."""
    votes = sum_across_ranks(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64), device)
    return int(votes.item()) == rank_and_world()[1]


def barrier(device: torch.device | str = "cpu") -> None:
    """Wait for every rank (implemented as a tiny all-reduce, which works on every backend)."""
    if is_distributed():
        sum_across_ranks(torch.zeros(1), device)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, e.g. CPU tensors)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
