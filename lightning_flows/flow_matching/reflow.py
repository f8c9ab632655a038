"""Rectified-flow reflow: pairs ``(x0, x1 = ODE(x0))`` from a trained flow, to retrain on.

Training flow matching on the teacher's own pairs (instead of independent noise/data pairs) gives
a field whose straight lines do not cross, so its ODE is (nearly) straight and one Euler step
samples it (Liu et al. 2023, "Flow straight and fast"). Repeating with the new model as teacher is
k-rectified flow.

Determinism: the pairs are generated in blocks of ``batch_size``; block ``b``'s noise comes from a
generator seeded by ``(seed, b)`` and the ODE solve is a fixed computation, so a seed (with the
number of ranks) fixes the pairs. Under DDP, rank ``r`` of ``w`` generates (and trains on) blocks ``b = r, r + w, ...``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_flows.ode import SolverConfig, integrate

_STREAM = 0x7265


def reflow_noise(shape: Sequence[int], seed: int, block: int) -> Tensor:
    """The noise ``x0`` of pair block ``block``: ``(n, *data_shape)`` from a generator seeded by ``(seed, block)``."""
    state = np.random.SeedSequence([_STREAM, seed, block]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=generator)


@torch.no_grad()
def generate_reflow_pairs(velocity, data_shape: Sequence[int], n_pairs: int, solver: SolverConfig, seed: int = 0,
                          batch_size: int = 4096, rank: int = 0, world_size: int = 1,
                          device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Integrate ``dx/dt = velocity(x, t)`` from noise at ``t = 0`` to ``t = 1``, ``n_pairs`` times.

    Returns this rank's ``(x0, x1)``, each ``(n, *data_shape)`` on the CPU (``n ~ n_pairs / world_size``).
    Every solve is bounded by ``solver.max_nfe``.
    """
    if n_pairs < world_size or batch_size < 1:
        raise ValueError(f"reflow needs at least one pair per rank and batch_size >= 1 "
                         f"(n_pairs={n_pairs}, world_size={world_size}, batch_size={batch_size}).")
    # At least one block per rank; blocks hold at most batch_size pairs and differ in size by at most one.
    sizes = [len(part) for part in np.array_split(np.arange(n_pairs), max(world_size, math.ceil(n_pairs / batch_size)))]
    x0s, x1s = [], []
    for block in range(rank, len(sizes), world_size):
        x0 = reflow_noise((sizes[block], *data_shape), seed, block)
        x1 = integrate(velocity, x0.to(device), solver, 0.0, 1.0).states
        x0s.append(x0)
        x1s.append(x1.float().cpu())
    x0, x1 = torch.cat(x0s), torch.cat(x1s)
    if not torch.isfinite(x1).all():
        raise ValueError("the reflow teacher produced non-finite samples; check the teacher checkpoint and its "
                         "solver (reflow_solver).")
    return x0, x1


def load_teacher(path: str | Path, data_shape: Sequence[int], device: torch.device | str = "cpu"):
    """The flow-matching model of checkpoint ``path`` (EMA weights when kept), checked against ``data_shape``."""
    from lightning_flows.checkpoints import CheckpointError, load_model_and_data
    from lightning_flows.models.flow_matching import FlowMatching

    teacher, _ = load_model_and_data(path, map_location=device)
    if not isinstance(teacher, FlowMatching):
        raise CheckpointError(f"reflow needs a FlowMatching teacher, but {path} holds a {type(teacher).__name__}; "
                              f"pass teacher_ckpt of a flow-matching run.")
    if tuple(teacher.data_shape) != tuple(data_shape):
        raise CheckpointError(f"the reflow teacher {path} models examples of shape {tuple(teacher.data_shape)}, "
                              f"the student {tuple(data_shape)}; use a teacher trained on the same dataset.")
    return teacher
