"""The divergence ``Tr(df/dz)`` of a vector field: the CNF log-density's rate of change.

Three ways to get it, all taking ``f: (B, *shape) -> (B, *shape)`` that acts on each example
independently (no batch statistics) and ``z: (B, *shape)``:

* :func:`exact_divergence`: the full per-example Jacobian's trace, ``D`` vector-Jacobian products
  vectorised with ``torch.func`` (batched backward passes, ``chunk_size`` rows at a time, only the
  diagonal kept). Cost ``O(D)`` passes, so meant for small ``D`` (toy 2D, 8x8 digits); see
  experiments/PERFORMANCE.md for the measured cost against ``D``. A field whose Jacobian is
  structurally sparse (a stack of small convolutions: each output pixel sees only nearby input pixels)
  can pass a ``colouring`` (:func:`local_colouring`): coordinates that never interact share one pass,
  so the same exact trace costs one pass per colour (25 instead of 64 on 8x8 digits for a 4-layer 3x3
  stack), Curtis, Powell and Reid's compression of sparse Jacobians.
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

from functools import lru_cache
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.func import vjp, vmap

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


def exact_divergence(f: VectorField, z: Tensor, frobenius: bool = False, chunk_size: int | None = None,
                     colouring: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``Tr(df/dz)`` per example, exactly. ``z: (B, *shape)`` -> ``(f(z), (B,), (B,) or None)``.

    Since examples are independent, the vector-Jacobian product of ``f(z)`` with the cotangent ``e_i``
    (coordinate ``i`` set to one in every example) returns row ``i`` of every example's Jacobian at
    once: ``(B, D)``. The rows are computed ``chunk_size`` at a time (vectorised with ``torch.func.vmap``
    over one forward pass) and only their diagonal entries, and squares for ``frobenius``, are kept, so
    memory is ``~ chunk_size * B * D`` (plus the backward passes' activations for ``chunk_size * B``
    examples) and the ``(D, B, D)`` Jacobian is never formed; ``None`` does all ``D`` rows in one chunk.

    ``colouring: (D,)`` integer colours ``0..K-1`` (:func:`local_colouring`) is a promise about ``f``: two
    different coordinates of one colour never affect each other's outputs (``df_i/dz_j = 0``). Then one
    cotangent per colour, the sum of its ``e_i``, returns ``sum_i row_i``, whose entry ``j`` of colour ``c`` is
    ``df_j/dz_j`` exactly (every other row of the colour is zero there): ``K`` passes instead of ``D``. The
    Frobenius norm needs every row separately, so ``frobenius=True`` ignores the colouring. A wrong colouring
    gives a wrong trace: fields that declare one are checked against the brute-force Jacobian in
    tests/test_divergence_colouring.py.
    """
    batch, dim = z.shape[0], z[0].numel()
    if colouring is not None and not frobenius:
        colouring = colouring.to(z.device).reshape(-1)
        if colouring.numel() != dim:
            raise ValueError(f"colouring has {colouring.numel()} entries for {dim} coordinates per example.")
        colours = int(colouring.max()) + 1
        directions = (colouring[None, :] == torch.arange(colours, device=z.device)[:, None]).to(z.dtype)
    else:
        directions = None
        colours = dim
    # Equal chunks of at most chunk_size passes (25 colours at 16 -> 13 + 12, not 16 + 9): the same bound on
    # memory, and the larger vmapped batches are slower per pass than smaller ones on CPU.
    n_chunks = 1 if chunk_size is None else -(-colours // max(1, int(chunk_size)))
    chunk = -(-colours // n_chunks)
    out, vjp_fn = vjp(f, z)

    def rows(cotangents: Tensor) -> Tensor:  # (B, *shape) cotangents -> (B, D) (sums of) Jacobian rows
        (grad,) = vjp_fn(cotangents)
        return grad.reshape(batch, dim)

    batched_rows = vmap(rows)
    divergence = z.new_zeros(batch)
    fro = z.new_zeros(batch) if frobenius else None
    for start in range(0, colours, chunk):
        if directions is not None:
            mask = directions[start:start + chunk]  # (k, D): one colour's coordinates per row
            cotangents = mask[:, None, :].expand(len(mask), batch, dim).reshape(len(mask), *z.shape)
            divergence = divergence + (batched_rows(cotangents) * mask[:, None, :]).sum(dim=(0, 2))
            continue
        index = torch.arange(start, min(start + chunk, dim), device=z.device)
        one_hot = torch.zeros(len(index), dim, dtype=z.dtype, device=z.device)
        one_hot[torch.arange(len(index), device=z.device), index] = 1.0
        cotangents = one_hot[:, None, :].expand(len(index), batch, dim).reshape(len(index), *z.shape)
        jac_rows = batched_rows(cotangents)  # (chunk, B, D): d f_i / d z for i in index
        divergence = divergence + jac_rows[torch.arange(len(index), device=z.device), :, index].sum(0)
        if fro is not None:
            fro = fro + jac_rows.pow(2).sum(dim=(0, 2))
    return out, divergence, fro


@lru_cache(maxsize=16)  # asked on every ODE function evaluation: one tensor per shape, shared (never modify it)
def local_colouring(shape: tuple[int, ...] | torch.Size, radius: int) -> Tensor:
    """Colours ``(D,)`` for a field on images ``shape = (C, H, W)`` whose output pixel depends only on input pixels
    within ``radius`` rows and columns of it (``radius`` stacked 3x3 convolutions with padding 1), in every channel.

    Pixels of one colour lie ``radius + 1`` or more rows or columns apart, so they never interact; channels of
    one pixel do, so each channel has its own colours: ``C * min(H, radius + 1) * min(W, radius + 1)`` colours.
    """
    if len(shape) != 3 or radius < 0:
        raise ValueError(f"local_colouring needs an image shape (C, H, W) and radius >= 0, got {tuple(shape)}, "
                         f"{radius}.")
    c, h, w = (int(n) for n in shape)
    period_h, period_w = min(h, radius + 1), min(w, radius + 1)
    channel = torch.arange(c)[:, None, None]
    row = (torch.arange(h) % period_h)[None, :, None]
    col = (torch.arange(w) % period_w)[None, None, :]
    return (channel * period_h * period_w + row * period_w + col).reshape(-1)


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
