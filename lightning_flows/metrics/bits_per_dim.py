"""Bits per dimension: the one place a model-space NLL becomes bits/dim, for every family.

For discrete data with ``L`` levels, dequantised to the unit cube and mapped affinely to model
space, a density ``p(x)`` gives ``log p(y) = log p(x) + preprocess_log_det`` on the cube and the
dequantisation bound ``log P(k) >= log p(y) - D log L`` on the integers. Hence

    bpd = (NLL_x - preprocess_log_det + D log L) / (D ln 2).

The dequantisation bound holds in expectation over the uniform draw ``u`` (``y = (k + u) / L``) and is loose by
the density's variation inside a cell. ``K`` draws give the tighter importance-weighted bound
``log P(k) >= E[log (1/K) sum_k p(y_k)] - D log L`` (Theis et al. 2016; Ho et al. 2019), whose model-space NLL
``-log (1/K) sum_k p(x_k)`` goes through this same formula (the evaluator's ``bpd_iw_<kind>``; see
:mod:`lightning_flows.evaluation.likelihood_labels` for what each reported likelihood is).

For continuous data (``levels=None``) the result is the differential entropy rate in bits/dim,
``(NLL_x - preprocess_log_det) / (D ln 2)``.
"""

from __future__ import annotations

import math

from torch import Tensor


def bits_per_dim(nll_model_space: Tensor | float, dim: int, levels: int | None = None,
                 preprocess_log_det: float = 0.0) -> Tensor | float:
    """``nll_model_space``: nats per example (any shape) -> bits per dimension, same shape."""
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    discrete_term = dim * math.log(levels) if levels is not None else 0.0
    return (nll_model_space - preprocess_log_det + discrete_term) / (dim * math.log(2.0))
