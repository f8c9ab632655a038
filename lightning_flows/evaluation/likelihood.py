"""Average negative log-likelihoods of a split, for every likelihood a family can report.

A family lists its likelihoods with ``model.likelihood_estimators()`` (``{kind: log_prob_fn}``, kinds
``exact``, ``bound`` or ``estimate``). The split is cut into fixed batches; batch ``i`` is seeded with
``chunk_seed(seed, i)`` (stochastic bounds and Hutchinson's probe are then reproducible) and batches
are dealt round-robin to DDP ranks, so the totals do not depend on the number of ranks. Nats and
counts are summed in float64 across ranks and divided once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_flows.evaluation.samples import chunk_seed
from lightning_flows.metrics.distributed import sum_across_ranks
from lightning_flows.performance import full_precision

# The lecture's "posterior gap" of a VAE: IWAE_K - ELBO (>= 0 in expectation), nats per example.
POSTERIOR_GAP = "posterior_gap_nats"


@dataclass
class SplitLikelihood:
    """``nll``: mean NLL in nats per example (model space) for each likelihood kind; ``examples``:
    how many were averaged; ``extras``: means of family-specific numbers (e.g. the posterior gap)."""

    nll: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    extras: dict[str, float] = field(default_factory=dict)


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


def split_likelihood(model, data: Tensor, batch_size: int, seed: int, rank: int, world: int,
                     extras: bool = True, progress=None) -> SplitLikelihood:
    """Mean NLLs of ``data: (N, *data_shape)`` (model space) under every likelihood of ``model``.

    A collective under DDP (every rank must call it). Families that differentiate inside ``log_prob``
    (the ODE trace of a CNF or flow matching) need autograd, so inference mode is left explicitly;
    gradients w.r.t. the weights stay off. Computed in float32 whatever the training precision
    (no autocast, no TF32: :func:`lightning_flows.performance.full_precision`).
    """
    estimators = model.likelihood_estimators()
    if not estimators:
        return SplitLikelihood()
    kinds = sorted(estimators)
    batches = data.split(batch_size)
    nats = {kind: 0.0 for kind in kinds}
    extra_names = family_extra_names(model, kinds) if extras else []
    extra_sums = {name: 0.0 for name in extra_names}
    count = 0
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    for index in range(rank, len(batches), world):
        x = batches[index].to(model.device)
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.no_grad(), \
                full_precision(model.device.type):
            torch.manual_seed(chunk_seed(seed, index))
            log_probs = {kind: estimators[kind](x.clone()) for kind in kinds}
            for kind, value in log_probs.items():
                if value.shape != (x.shape[0],):
                    raise ValueError(f"{type(model).__name__} returned log-likelihoods of shape {tuple(value.shape)} "
                                     f"for a batch of {x.shape[0]}; it must return one value per example, (B,).")
                nats[kind] += float(-value.double().sum())
            for name, value in _family_extras(model, x, log_probs, extra_names).items():
                extra_sums[name] += float(value.double().sum())
        count += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
    local = torch.tensor([count] + [nats[k] for k in kinds] + [extra_sums[e] for e in extra_names],
                         dtype=torch.float64)
    totals = sum_across_ranks(local, model.device).tolist()
    total = int(round(totals[0]))
    if total == 0:
        return SplitLikelihood()
    nll = {kind: totals[1 + i] / total for i, kind in enumerate(kinds)}
    means = {name: totals[1 + len(kinds) + i] / total for i, name in enumerate(extra_names)}
    return SplitLikelihood(nll=nll, examples=total, extras=means)
