"""Straightness of ODE sampling paths (Liu et al. 2023, "Flow straight and fast"): how far the velocity
along each path strays from the path's mean velocity.

For a path ``x_t``, ``t`` in ``[t0, t1]`` (length ``L = t1 - t0``) with velocity ``v_t = v(x_t, t)``::

    S = int || (x_t1 - x_t0) / L - v_t ||^2 dt     (Liu et al.'s S(Z) on [0, 1], averaged over paths)
    K = int || v_t ||^2 dt                         (the path's kinetic energy)

``S = 0`` exactly when the path is a straight line run at constant speed, the case one Euler step
integrates without error; since ``x_t1 - x_t0 = int v_t dt``, ``S = K - ||x_t1 - x_t0||^2 / L`` and
``S / K`` in ``[0, 1]`` is scale-free: the fraction of the kinetic energy not spent on net displacement.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PathStraightness(NamedTuple):
    """Per path: ``straightness`` (S) and ``kinetic_energy`` (K), each ``(N,)``."""

    straightness: Tensor
    kinetic_energy: Tensor


def path_straightness(velocities: Tensor, times: Tensor) -> PathStraightness:
    """S and K (see the module docstring) of ``N`` paths from their velocities at ``T`` times.

    ``velocities: (T, N, *shape)``, the field along each path at ``times: (T,)`` (strictly monotone,
    ``T >= 2``). Both integrals, and the displacement ``x_t1 - x_t0 = int v dt``, use the trapezoid rule
    on ``times``, so ``S = K - ||displacement||^2 / L`` holds exactly for the returned values.
    """
    if velocities.ndim < 2 or times.ndim != 1 or len(times) != len(velocities) or len(times) < 2:
        raise ValueError(f"path_straightness needs velocities (T, N, ...) at T >= 2 times (T,); got velocities of "
                         f"shape {tuple(velocities.shape)} and times of shape {tuple(times.shape)}.")
    dt = times[1:] - times[:-1]
    if not ((dt > 0).all() or (dt < 0).all()):
        raise ValueError("path_straightness needs strictly monotone times.")
    v = velocities.double().flatten(2)  # (T, N, D)
    dt = dt.double().to(v.device)
    weights = torch.zeros(len(times), dtype=torch.float64, device=v.device)  # trapezoid weights, sum = L
    weights[:-1] += dt / 2
    weights[1:] += dt / 2
    length = weights.sum()
    mean_velocity = torch.einsum("t,tnd->nd", weights, v) / length  # displacement / L
    deviation = (v - mean_velocity).pow(2).sum(-1)  # (T, N)
    return PathStraightness(straightness=torch.einsum("t,tn->n", weights, deviation).abs(),
                            kinetic_energy=torch.einsum("t,tn->n", weights, v.pow(2).sum(-1)).abs())
