"""The contract every bijection honours, and composition of bijections into one flow.

Direction convention: a layer's ``forward`` is the *normalizing* direction, data -> latent,
``x -> (z, log|det dz/dx|)``; ``inverse`` is the generative direction ``z -> x``. With the lecture's
generator ``x = g(z)`` this means ``forward = g^{-1}`` and

    log p_x(x) = log p_z(z) + sum_k log|det J_{f_k}|  =  log p_z(z) - sum_k log|det J_{g_k}|,

the lecture's change-of-variables formula (summed in :meth:`FlowSequence.forward`, used in
:class:`lightning_flows.flows.distribution.NormalizingFlow`).

Conditional flows: ``forward(x, context)`` and ``inverse(z, context)`` take a conditioning vector per example,
``context: (B, C_ctx)`` (e.g. a one-hot class label); layers that do not depend on it ignore it. For a fixed
context every layer is still a bijection of ``x`` with the same exact log-determinant, so ``log p(x | c)`` is
exact. Containers hand the context on only when there is one, so a layer written without the argument still
composes into unconditional flows.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn


class Bijection(nn.Module):
    """An invertible map with a tractable log-determinant.

    ``forward(x: (B, *shape), context: (B, C_ctx) | None) -> (z: (B, *shape'), log_det: (B,))`` in nats;
    ``inverse(z, context) -> x``.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def with_context(layer: nn.Module, method: str, x: Tensor, context: Tensor | None):
    """``layer.method(x, context)``, or ``layer.method(x)`` without a context (layers that take none)."""
    call = layer if method == "forward" else getattr(layer, method)
    return call(x) if context is None else call(x, context)


def zero_log_det(x: Tensor) -> Tensor:
    """A ``(B,)`` zero log-determinant matching ``x``'s batch, device and dtype."""
    return x.new_zeros(x.shape[0])


class FlowSequence(Bijection):
    """Composition ``f_K o ... o f_1``: log-determinants add (chain rule), inverses run in reverse."""

    def __init__(self, layers: Iterable[Bijection]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zero_log_det(x)
        for layer in self.layers:
            x, log_det = with_context(layer, "forward", x, context)
            total = total + log_det
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            z = with_context(layer, "inverse", z, context)
        return z

    def __len__(self) -> int:
        return len(self.layers)


def flatten_sum(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


__all__ = ["Bijection", "FlowSequence", "flatten_sum", "with_context", "zero_log_det"]
