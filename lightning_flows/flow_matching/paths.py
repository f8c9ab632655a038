"""The probability path flow matching regresses on: the straight line, optionally widened by Gaussian noise.

Given a coupled pair ``(x0, x1)`` (noise, data) and a time ``t`` in [0, 1]::

    x_t = (1 - t) x0 + t x1 + sigma * eps,    eps ~ N(0, I)
    u_t = x1 - x0                               (the regression target)

``sigma = 0`` is the lecture's path. ``sigma > 0`` is the constant-width Gaussian path of
I-CFM/OT-CFM (Tong et al. 2023): the conditional path ``N((1 - t) x0 + t x1, sigma^2 I)`` whose
conditional field is still ``x1 - x0``; it smooths the target field where straight lines cross, at
the price of marginals blurred by ``N(0, sigma^2 I)`` at both ends (so keep sigma small against the
data's scale).
"""

from __future__ import annotations

from torch import Tensor


def linear_path(x0: Tensor, x1: Tensor, t: Tensor, sigma: float = 0.0,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x_t, u_t)`` of the path above.

    ``x0, x1: (B, *shape)``, ``t: (B,)``; ``noise`` (``eps``, shaped like ``x0``) is required when
    ``sigma > 0`` and ignored otherwise.
    """
    t_ = t.reshape(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - t_) * x0 + t_ * x1
    if sigma > 0:
        if noise is None:
            raise ValueError("linear_path with sigma > 0 needs the Gaussian noise eps (noise=...), shaped like x0.")
        xt = xt + sigma * noise
    return xt, x1 - x0
