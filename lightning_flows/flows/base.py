"""The contract every bijection honours, and composition of bijections into one flow.

Direction convention: a layer's ``forward`` is the *normalizing* direction, data -> latent,
``x -> (z, log|det dz/dx|)``; ``inverse`` is the generative direction ``z -> x``. With the lecture's
generator ``x = g(z)`` this means ``forward = g^{-1}`` and

    log p_x(x) = log p_z(z) + sum_k log|det J_{f_k}|  =  log p_z(z) - sum_k log|det J_{g_k}|,

the lecture's change-of-variables formula (summed in :meth:`FlowSequence.forward`, used in
:class:`lightning_flows.flows.distribution.NormalizingFlow`).
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn


class Bijection(nn.Module):
    """An invertible map with a tractable log-determinant.

    ``forward(x: (B, *shape)) -> (z: (B, *shape'), log_det: (B,))`` in nats; ``inverse(z) -> x``.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def zero_log_det(x: Tensor) -> Tensor:
    """A ``(B,)`` zero log-determinant matching ``x``'s batch, device and dtype."""
    return x.new_zeros(x.shape[0])


class FlowSequence(Bijection):
    """Composition ``f_K o ... o f_1``: log-determinants add (chain rule), inverses run in reverse."""

    def __init__(self, layers: Iterable[Bijection]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = zero_log_det(x)
        for layer in self.layers:
            x, log_det = layer(x)
            total = total + log_det
        return x, total

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def __len__(self) -> int:
        return len(self.layers)


def flatten_sum(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


__all__ = ["Bijection", "FlowSequence", "zero_log_det", "flatten_sum"]
