"""The divergence ``Tr(df/dz)`` of a vector field: the CNF log-density's rate of change.

Three ways to get it, all taking ``f: (B, *shape) -> (B, *shape)`` that acts on each example
independently (no batch statistics) and ``z: (B, *shape)``:

* :func:`exact_divergence`: the full per-example Jacobian's trace, ``D`` vector-Jacobian products
  vectorised with ``torch.func`` (one batched backward pass, no Python loop). Cost ``O(D)`` passes,
  so meant for small ``D`` (toy 2D, 8x8 digits).
* :func:`hutchinson_divergence`: the lecture's unbiased estimate ``v^T (df/dz) v`` with
  ``E[v v^T] = I`` (Rademacher or Gaussian ``v``), one vector-Jacobian product whatever ``D``.
  The probe ``v`` is drawn once per solve by the caller (:func:`sample_probe`) and held fixed
  while the solver integrates, as FFJORD does: a probe redrawn at every evaluation would make the
  ODE right-hand side random and break adaptive step-size control.
* :func:`brute_force_divergence`: a Python loop of ``D`` autograd calls (FFJORD's brute force). A
  reference for tests and the benchmark only.

Each returns ``(f(z), divergence, frobenius)`` where ``frobenius: (B,)`` is ``||df/dz||_F^2``
(exactly, or unbiasedly as ``||v^T df/dz||^2``) when asked for, the RNODE Jacobian regulariser.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor
from torch.func import jacrev, vjp

VectorField = Callable[[Tensor], Tensor]
ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS = ("rademacher", "gaussian")
DIVERGENCE_KINDS = ("exact", "hutchinson")


def sample_probe(like: Tensor, kind: ProbeKind = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """A probe ``v`` shaped like ``like`` with ``E[v v^T] = I``: entries +-1 or standard normal."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return bits.to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    raise ValueError(f"Unknown Hutchinson probe '{kind}'. Choose one of: {', '.join(PROBE_KINDS)}.")


def exact_divergence(f: VectorField, z: Tensor, frobenius: bool = False,
                     chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``Tr(df/dz)`` per example, exactly. ``z: (B, *shape)`` -> ``(f(z), (B,), (B,) or None)``.

    Since examples are independent, the Jacobian of ``sum_b f(z)_b`` w.r.t. ``z`` holds every
    example's Jacobian side by side: ``(*shape, B, *shape)``; its "diagonal" over the two
    ``shape`` axes is the per-example trace. ``chunk_size`` bounds how many of the ``D`` products
    run at once (memory ``~ chunk_size * B * D``).
    """
    def summed(z_):
        out = f(z_)
        return out.sum(0), out

    jac, out = jacrev(summed, has_aux=True, chunk_size=chunk_size)(z)
    batch, dim = z.shape[0], z[0].numel()
    jac = jac.reshape(dim, batch, dim)
    divergence = torch.diagonal(jac, dim1=0, dim2=2).sum(-1)
    fro = jac.pow(2).sum(dim=(0, 2)) if frobenius else None
    return out, divergence, fro


def hutchinson_divergence(f: VectorField, z: Tensor, probe: Tensor,
                          frobenius: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unbiased ``v^T (df/dz) v`` per example with the given ``probe: (B, *shape)``.

    Computed as a vector-Jacobian product ``v^T J`` (one backward pass), so the Jacobian is never
    formed; ``||v^T J||^2`` is then an unbiased estimate of ``||J||_F^2`` for free.
    """
    out, vjp_fn = vjp(f, z)
    (v_jac,) = vjp_fn(probe)
    divergence = (v_jac * probe).flatten(1).sum(1)
    fro = v_jac.pow(2).flatten(1).sum(1) if frobenius else None
    return out, divergence, fro


def brute_force_divergence(f: VectorField, z: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """Reference only: ``D`` separate autograd calls, one per output coordinate (FFJORD's loop).

    ``create_graph=True`` keeps it differentiable like the others (what training needs).
    """
    with torch.enable_grad():
        z = z if z.requires_grad else z.detach().requires_grad_(True)
        out = f(z)
        flat_out, divergence = out.flatten(1), torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for i in range(flat_out.shape[1]):
            (grad,) = torch.autograd.grad(flat_out[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
            divergence = divergence + grad.flatten(1)[:, i]
    return out, divergence
