"""Toy 2D densities sampled from their generative definitions (FFJORD's benchmark set).

Every sampler takes ``(n, generator)`` and returns a float tensor of shape ``(n, 2)``; the same
generator state gives the same points, so splits are reproducible from a seed.

``8gaussians`` and ``checkerboard`` also have closed-form log-densities, which lets a model's
test NLL be compared with the data's true entropy (the best achievable NLL).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# 8gaussians: eight isotropic Gaussians on a circle of radius 4, the whole set scaled by 1/sqrt(2).
_EIGHT_GAUSS_RADIUS = 4.0
_EIGHT_GAUSS_STD = 0.5
_EIGHT_GAUSS_SCALE = 1.0 / math.sqrt(2.0)


def _eight_gaussian_centers() -> Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return torch.stack([angles.cos(), angles.sin()], dim=1) * _EIGHT_GAUSS_RADIUS


def sample_8gaussians(n: int, generator: torch.Generator) -> Tensor:
    which = torch.randint(0, 8, (n,), generator=generator)
    centers = _eight_gaussian_centers().float()[which]
    points = centers + _EIGHT_GAUSS_STD * torch.randn(n, 2, generator=generator)
    return points * _EIGHT_GAUSS_SCALE


def log_density_8gaussians(x: Tensor) -> Tensor:
    """Exact log p(x) of :func:`sample_8gaussians`. ``x: (B, 2)`` -> ``(B,)``."""
    x = x.double()
    centers = _eight_gaussian_centers().to(x.device) * _EIGHT_GAUSS_SCALE
    std = _EIGHT_GAUSS_STD * _EIGHT_GAUSS_SCALE
    sq = ((x[:, None, :] - centers[None]) ** 2).sum(-1)  # (B, 8)
    log_comp = -sq / (2 * std**2) - math.log(2 * math.pi * std**2)
    return (torch.logsumexp(log_comp, dim=1) - math.log(8)).float()


def sample_checkerboard(n: int, generator: torch.Generator) -> Tensor:
    # x1 uniform on [-2, 2); x2 uniform on one of the two unit cells of its column that form the
    # checkerboard; the whole board scaled by 2, so the support is 8 cells of area 4 -> area 32.
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) - 2 * torch.randint(0, 2, (n,), generator=generator).float()
    x2 = x2 + torch.floor(x1).remainder(2)
    return torch.stack([x1, x2], dim=1) * 2


def log_density_checkerboard(x: Tensor) -> Tensor:
    """Exact log p(x) of :func:`sample_checkerboard`: uniform, log(1/32), on its support."""
    u = x.double() / 2
    in_box = (u[:, 0] >= -2) & (u[:, 0] < 2) & (u[:, 1] >= -2) & (u[:, 1] < 2)
    col = torch.floor(u[:, 0]).remainder(2)
    row = torch.floor(u[:, 1]).remainder(2)
    on_board = in_box & (col == row)
    inside = torch.full_like(u[:, 0], -math.log(32.0))
    return torch.where(on_board, inside, torch.full_like(inside, -math.inf)).float()


def sample_moons(n: int, generator: torch.Generator, noise: float = 0.1) -> Tensor:
    n_upper = n // 2
    theta = torch.rand(n, generator=generator) * math.pi
    upper = torch.arange(n) < n_upper
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    points = torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=generator)
    # centre and scale to roughly unit variance like the other densities
    return (points - torch.tensor([0.5, 0.25])) * 2


def sample_circles(n: int, generator: torch.Generator, factor: float = 0.5, noise: float = 0.08) -> Tensor:
    theta = torch.rand(n, generator=generator) * 2 * math.pi
    radius = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, factor)
    points = torch.stack([theta.cos(), theta.sin()], dim=1) * radius[:, None]
    return 3 * (points + noise * torch.randn(n, 2, generator=generator))


def sample_pinwheel(n: int, generator: torch.Generator, arms: int = 5, rate: float = 0.25) -> Tensor:
    # Each arm is a stretched Gaussian rotated by an angle that grows with its radius.
    radial_std, tangential_std = 0.3, 0.1
    arm = torch.randint(0, arms, (n,), generator=generator)
    feats = torch.randn(n, 2, generator=generator) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angle = arm.float() * (2 * math.pi / arms) + rate * feats[:, 0].exp()
    rot = torch.stack(
        [torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2
    )
    return 2 * torch.einsum("bij,bj->bi", rot, feats)


def sample_2spirals(n: int, generator: torch.Generator) -> Tensor:
    m = n // 2
    r = torch.sqrt(torch.rand(n - m, 1, generator=generator)) * (540 * 2 * math.pi / 360)
    arm = torch.cat([-torch.cos(r) * r + torch.rand(n - m, 1, generator=generator) * 0.5,
                     torch.sin(r) * r + torch.rand(n - m, 1, generator=generator) * 0.5], dim=1)
    points = torch.cat([arm, -arm], dim=0)[:n]
    points = points + 0.1 * torch.randn(n, 2, generator=generator)
    return points / 3


TOY_SAMPLERS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": sample_moons,
    "8gaussians": sample_8gaussians,
    "checkerboard": sample_checkerboard,
    "circles": sample_circles,
    "pinwheel": sample_pinwheel,
    "2spirals": sample_2spirals,
}

TOY_LOG_DENSITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "8gaussians": log_density_8gaussians,
    "checkerboard": log_density_checkerboard,
}

# Mixtures with known, equally weighted modes: (centres (K, 2), per-mode std), for mode-coverage counts.
TOY_MODES: dict[str, tuple[Tensor, float]] = {
    "8gaussians": ((_eight_gaussian_centers() * _EIGHT_GAUSS_SCALE).float(), _EIGHT_GAUSS_STD * _EIGHT_GAUSS_SCALE),
}
