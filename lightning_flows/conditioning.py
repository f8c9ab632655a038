"""Class labels of the class-conditional families (issue 14): label checks and draws shared by all of them.

A family built with ``num_classes = K > 0`` models ``p(x | y)`` for ``y in {0, ..., K-1}`` with the uniform
class prior ``p(y) = 1 / K``; ``num_classes = 0`` is the unconditional model (flow matching and diffusion add
classifier-free guidance: :mod:`lightning_flows.nn.class_conditioning`). These helpers check the labels
a caller passes and draw them where the caller leaves them out, with the same error messages everywhere.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

CONDITIONAL_DATA_FIX = "set `data.conditional: true` so the DataModule serves labels and the CLI links num_classes"


def check_num_classes(num_classes: int) -> int:
    if int(num_classes) != num_classes or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {num_classes}.")
    return int(num_classes)


def check_labels(family: str, num_classes: int, y: Tensor, batch: int) -> Tensor:
    """``y`` as ``(batch,)`` int64 class indices in ``[0, num_classes)``, or a ValueError naming the fix."""
    if num_classes == 0:
        raise ValueError(f"{family} was built unconditional (num_classes=0) but got class labels; "
                         f"{CONDITIONAL_DATA_FIX}, or pass no labels.")
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{family} class labels must be an integer tensor of shape ({batch},), got "
                         f"{type(y).__name__ if not isinstance(y, Tensor) else y.dtype}.")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{family} expected class labels of shape ({batch},), one per example, got {tuple(y.shape)}.")
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{family} has num_classes={num_classes}, so labels must lie in [0, {num_classes - 1}]; "
                         f"got labels in [{int(y.min())}, {int(y.max())}].")
    return y.long()


def require_labels(family: str, num_classes: int, y: Tensor | None, batch: int) -> Tensor | None:
    """Training labels: None for an unconditional model, checked ``(batch,)`` labels for a conditional one."""
    if y is None:
        if num_classes > 0:
            raise ValueError(f"{family} was built with num_classes={num_classes} and trains on labelled batches "
                             f"(x, y), but got a batch without labels; {CONDITIONAL_DATA_FIX}.")
        return None
    return check_labels(family, num_classes, y, batch)


def sampling_labels(family: str, num_classes: int, y: Tensor | None, n: int, device) -> Tensor | None:
    """The classes ``sample(n, y)`` draws: None when unconditional; ``y`` checked; or, when a conditional
    model is asked for no particular class, ``n`` draws from the uniform class prior."""
    if y is None:
        return torch.randint(num_classes, (n,), device=device) if num_classes > 0 else None
    return check_labels(family, num_classes, y, n).to(device)


def check_no_guidance(family: str, guidance: float) -> None:
    """These families have no classifier-free guidance: ``guidance`` must stay 1.0 (the plain conditional)."""
    if guidance != 1.0:
        raise ValueError(f"{family} has no classifier-free guidance (only flow matching and diffusion do): "
                         f"sample with guidance=1.0 (got {guidance}).")


def log_uniform_prior(num_classes: int) -> float:
    """``log p(y) = -log K`` of the uniform class prior."""
    return -math.log(num_classes)


def log_prob_every_class(log_prob_given: Callable[[Tensor, Tensor], Tensor], x: Tensor, num_classes: int,
                         rows_per_pass: int) -> Tensor:
    """``log p(x | y = k)`` for every class ``k``: ``x: (B, *shape)`` -> ``(B, K)`` nats, from
    ``log_prob_given(rows, labels) -> (rows,)``. The classes run as batches of class-major copies of ``x`` (copy ``j``
    scored as the pass's ``j``-th class), at most ``rows_per_pass`` rows a pass (at least one class)."""
    b = x.shape[0]
    classes_per_pass = max(1, rows_per_pass // max(b, 1))
    columns = []
    for first in range(0, num_classes, classes_per_pass):
        classes = torch.arange(first, min(first + classes_per_pass, num_classes), device=x.device)
        rows = x.expand(len(classes), *x.shape).reshape(-1, *x.shape[1:])
        columns.append(log_prob_given(rows, classes.repeat_interleave(b)).view(len(classes), b).T)
    return torch.cat(columns, dim=1)


def marginalise_classes(every_class: Tensor) -> Tensor:
    """``(B, K)`` per-class ``log p(x | k)`` -> ``(B,)`` ``log p(x) = logsumexp_k [log p(x | k) + log p(k)]`` under
    the uniform class prior."""
    return torch.logsumexp(every_class, dim=1) + log_uniform_prior(every_class.shape[1])


def one_hot(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """``y: (B,)`` -> ``(B, num_classes)`` one-hot rows in ``like``'s dtype and device."""
    return torch.nn.functional.one_hot(y.to(like.device), num_classes).to(like.dtype)


__all__ = ["CONDITIONAL_DATA_FIX", "check_labels", "check_no_guidance", "check_num_classes", "log_prob_every_class",
           "log_uniform_prior", "marginalise_classes",
           "one_hot", "require_labels", "sampling_labels"]
