"""The marginal velocity of the linear path estimated over a batch of data (a stable target field).

On ``z_t = (1 - t) x0 + t x1`` with ``x0 ~ N(0, I)``, the velocity ``v = x1 - x0 = (x1 - z_t) / (1 - t)`` of one pair is
a noisy draw of the marginal velocity ``E[v | z_t] = (E[x1 | z_t] - z_t) / (1 - t)``. Its posterior mean over the data
can be estimated with the batch's own data points as references (Xu et al. 2023, "Stable Target Field for Reduced
Variance Score Estimation"): self-normalised weights ``w_j ~ N(z_t; t x1_j, (1 - t)^2 I)``, ``E[x1 | z_t] ~ sum_j w_j
x1_j``. At ``t = 0`` every reference weighs the same (``z`` says nothing about ``x1``), near ``t = 1`` the pair's own
``x1`` takes all the weight and the estimate is its ``x1 - x0``. Consistent as the batch grows, biased for a finite
one, far less noisy than one pair's velocity where ``t`` is small.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_marginal_velocity"]


def batch_marginal_velocity(z: Tensor, t: Tensor, x1: Tensor, labels: Tensor | None = None,
                            null_label: int | None = None) -> Tensor:
    """``E[x1 - x0 | z_t]`` with the batch's data ``x1: (B, *shape)`` as references, for ``z: (B, *shape)`` at
    ``t: (B,)`` (each row's ``z`` was drawn from its own ``x1``); ``(B, *shape)``.

    With ``labels: (B,)`` a row weighs only the references of its own class (the class-conditional posterior); a row
    whose label is ``null_label`` (dropped for guidance) weighs every reference."""
    flat_z, flat_x1 = z.flatten(1).double(), x1.flatten(1).double()
    t_ = t.double()[:, None]
    scale = (1.0 - t_).clamp_min(1e-6)
    # log N(z_i; t_i x1_j, (1 - t_i)^2 I) up to a constant of row i: (B, B)
    distance = ((flat_z ** 2).sum(1, keepdim=True) - 2.0 * t_ * (flat_z @ flat_x1.T)
                + t_ ** 2 * (flat_x1 ** 2).sum(1)[None, :])  # |z_i - t_i x1_j|^2 without a (B, B, D) tensor
    log_w = -distance / (2.0 * scale ** 2)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        if null_label is not None:
            same = same | (labels[:, None] == null_label)
        log_w = log_w.masked_fill(~same, float("-inf"))
    posterior_x1 = torch.softmax(log_w, dim=1) @ flat_x1
    velocity = (posterior_x1 - flat_z) / scale
    return velocity.to(z.dtype).reshape(z.shape)
