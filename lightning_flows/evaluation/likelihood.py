"""Average negative log-likelihoods of a split, for every likelihood a family can report.

A family lists its likelihoods with ``model.likelihood_estimators()`` (``{kind: log_prob_fn}``, kinds
``exact``, ``bound`` or ``estimate``). The split is cut into fixed batches; batch ``i`` is seeded with
``chunk_seed(seed, i)`` (stochastic bounds and Hutchinson's probe are then reproducible) and batches
are dealt round-robin to DDP ranks, so the totals do not depend on the number of ranks. Nats and
counts are summed in float64 across ranks and divided once.

On discrete data a likelihood that is a continuous density (see :mod:`.likelihood_labels`) is also averaged
over ``K`` dequantisation draws per example, ``log (1/K) sum_k p(k + u_k)`` (log-mean-exp): draw 0 is the
split's fixed evaluation noise (the one-draw value itself), draws ``1..K-1`` are seeded by
:func:`iw_seed` from the batch and draw index, so the result too is the same for any number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_flows.data.quantisation import dequantise
from lightning_flows.evaluation.samples import chunk_seed
from lightning_flows.metrics.distributed import sum_across_ranks
from lightning_flows.performance import full_precision

# The lecture's "posterior gap" of a VAE: IWAE_K - ELBO (>= 0 in expectation), nats per example.
POSTERIOR_GAP = "posterior_gap_nats"


@dataclass
class SplitLikelihood:
    """``nll``: mean NLL in nats per example (model space) for each likelihood kind; ``examples``:
    how many were averaged; ``extras``: means of family-specific numbers (e.g. the posterior gap);
    ``iw_nll``: for the kinds averaged over dequantisation draws, the mean of ``-log (1/K) sum_k p(k + u_k)``."""

    nll: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    extras: dict[str, float] = field(default_factory=dict)
    iw_nll: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Dequantisation:
    """The discrete data behind a split, for the importance-weighted likelihood: ``levels_data: (N, *shape)``
    integer levels in ``0..levels-1`` (the rows of the model-space split, in order), ``samples`` draws ``K``
    per example (``>= 2``), for the likelihood ``kinds`` that are continuous densities."""

    levels_data: Tensor
    levels: int
    samples: int
    kinds: tuple[str, ...]


def iw_seed(seed: int, batch_index: int, draw: int) -> int:
    """The RNG seed of dequantisation draw ``draw`` (``>= 1``) of batch ``batch_index`` (rank-independent)."""
    return chunk_seed(seed, batch_index) * 1009 + draw


def log_mean_exp(values: Tensor, dim: int = 0) -> Tensor:
    """``log (1/K) sum_k exp(values_k)`` along ``dim``, computed stably (float64)."""
    return torch.logsumexp(values.double(), dim=dim) - math.log(values.shape[dim])


def family_extra_names(model, kinds) -> list[str]:
    """Family-specific numbers for the lecture's "key limitation" column (decided from the model alone,
    so every rank agrees on them even with no batch to evaluate)."""
    # A VAE: IWAE_K bound minus ELBO. Not for a conditional VAE: its likelihood here is the marginal over classes,
    # which has no single ELBO to compare with.
    conditional = getattr(model, "is_conditional", False)
    return [POSTERIOR_GAP] if hasattr(model, "elbo") and "bound" in kinds and not conditional else []


def _family_extras(model, x: Tensor, log_probs: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """Per-example values of ``names``: ``(B,)`` each."""
    return {POSTERIOR_GAP: log_probs["bound"] - model.elbo(x)} if POSTERIOR_GAP in names else {}


def _log_probs(model, estimators: dict, kinds, x: Tensor) -> dict[str, Tensor]:
    """``{kind: log p(x)}`` of one batch ``x: (B, ...)``, each checked to be ``(B,)``."""
    out = {}
    for kind in kinds:
        value = estimators[kind](x.clone())
        if value.shape != (x.shape[0],):
            raise ValueError(f"{type(model).__name__} returned log-likelihoods of shape {tuple(value.shape)} "
                             f"for a batch of {x.shape[0]}; it must return one value per example, (B,).")
        out[kind] = value
    return out


def _importance_weighted(model, estimators: dict, first: dict[str, Tensor], levels: Tensor,
                         dequantisation: Dequantisation, seed: int, index: int) -> dict[str, Tensor]:
    """``log (1/K) sum_d p(k + u_d)`` per example ``(B,)`` for each IW kind of one batch of ``levels: (B, ...)``:
    draw 0 is ``first`` (the value at the split's fixed evaluation noise), draws ``1..K-1`` are new."""
    draws = {kind: [first[kind].double()] for kind in dequantisation.kinds}
    for draw in range(1, dequantisation.samples):
        torch.manual_seed(iw_seed(seed, index, draw))
        noise = torch.rand(levels.shape)  # on the CPU: the same draws on any device
        x = dequantise(levels, noise, dequantisation.levels).to(model.device)
        for kind, value in _log_probs(model, estimators, dequantisation.kinds, x).items():
            draws[kind].append(value.double())
    return {kind: log_mean_exp(torch.stack(values)) for kind, values in draws.items()}


def split_likelihood(model, data: Tensor, batch_size: int, seed: int, rank: int, world: int,
                     extras: bool = True, progress=None,
                     dequantisation: Dequantisation | None = None) -> SplitLikelihood:
    """Mean NLLs of ``data: (N, *data_shape)`` (model space) under every likelihood of ``model``; with
    ``dequantisation`` (the levels behind ``data``), also the importance-weighted NLL of its kinds.

    A collective under DDP (every rank must call it). Families that differentiate inside ``log_prob``
    (the ODE trace of a CNF or flow matching) need autograd, so inference mode is left explicitly;
    gradients w.r.t. the weights stay off. Computed in float32 whatever the training precision
    (no autocast, no TF32: :func:`lightning_flows.performance.full_precision`). ``progress`` advances by the
    examples of each likelihood pass (``K`` passes per batch with ``dequantisation``).
    """
    estimators = model.likelihood_estimators()
    if not estimators:
        return SplitLikelihood()
    kinds = sorted(estimators)
    iw_kinds = sorted(dequantisation.kinds) if dequantisation is not None else []
    unknown = set(iw_kinds) - set(kinds)
    if unknown:
        raise ValueError(f"Importance weighting asked for likelihood kind(s) {sorted(unknown)} that "
                         f"{type(model).__name__} does not report ({kinds}).")
    if iw_kinds and len(dequantisation.levels_data) != len(data):
        raise ValueError(f"The levels behind the split ({len(dequantisation.levels_data)} rows) must match its "
                         f"{len(data)} model-space rows.")
    batches = data.split(batch_size)
    level_batches = dequantisation.levels_data.split(batch_size) if iw_kinds else None
    nats = {kind: 0.0 for kind in kinds}
    iw_nats = {kind: 0.0 for kind in iw_kinds}
    extra_names = family_extra_names(model, kinds) if extras else []
    extra_sums = {name: 0.0 for name in extra_names}
    count = 0
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    for index in range(rank, len(batches), world):
        x = batches[index].to(model.device)
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.no_grad(), \
                full_precision(model.device.type):
            torch.manual_seed(chunk_seed(seed, index))
            log_probs = _log_probs(model, estimators, kinds, x)
            for kind, value in log_probs.items():
                nats[kind] += float(-value.double().sum())
            for name, value in _family_extras(model, x, log_probs, extra_names).items():
                extra_sums[name] += float(value.double().sum())
            if progress is not None:
                progress.update(x.shape[0])
            if iw_kinds:
                weighted = _importance_weighted(model, estimators, log_probs, level_batches[index],
                                                dequantisation, seed, index)
                for kind, value in weighted.items():
                    iw_nats[kind] += float(-value.sum())
                if progress is not None:
                    progress.update(x.shape[0] * (dequantisation.samples - 1))
        count += x.shape[0]
    local = torch.tensor([count] + [nats[k] for k in kinds] + [extra_sums[e] for e in extra_names]
                         + [iw_nats[k] for k in iw_kinds], dtype=torch.float64)
    totals = sum_across_ranks(local, model.device).tolist()
    total = int(round(totals[0]))
    if total == 0:
        return SplitLikelihood()
    nll = {kind: totals[1 + i] / total for i, kind in enumerate(kinds)}
    means = {name: totals[1 + len(kinds) + i] / total for i, name in enumerate(extra_names)}
    offset = 1 + len(kinds) + len(extra_names)
    iw_nll = {kind: totals[offset + i] / total for i, kind in enumerate(iw_kinds)}
    return SplitLikelihood(nll=nll, examples=total, extras=means, iw_nll=iw_nll)
