"""Bijective layers with exact inverses and log-determinants, composed into normalizing flows.

Every layer maps ``x -> (z, log|det dz/dx|)`` (data -> latent) and has ``inverse(z) -> x``; a flow is
a :class:`FlowSequence` of layers plus a base density (:class:`NormalizingFlow`).
"""

from lightning_flows.flows.actnorm import ActNorm
from lightning_flows.flows.base import Bijection, FlowSequence, flatten_sum, zero_log_det
from lightning_flows.flows.coupling import AffineCoupling, ConvConditioner, MLPConditioner, bounded_scale
from lightning_flows.flows.distribution import ClassConditionalNormal, NormalizingFlow, StandardNormal
from lightning_flows.flows.invertible_linear import InvertibleConv1x1
from lightning_flows.flows.masks import channel_mask, checkerboard_mask, vector_mask
from lightning_flows.flows.multiscale import FactorOut, Reshape, Squeeze, Unsqueeze
from lightning_flows.flows.preprocess import LogitPreprocess
from lightning_flows.flows.spline import SplineCoupling, rational_quadratic_spline, spline_params_per_dim

__all__ = ["ActNorm", "AffineCoupling", "Bijection", "ClassConditionalNormal", "ConvConditioner", "FactorOut",
           "FlowSequence", "InvertibleConv1x1", "LogitPreprocess", "MLPConditioner", "NormalizingFlow", "Reshape",
           "SplineCoupling", "Squeeze", "StandardNormal", "Unsqueeze", "bounded_scale", "channel_mask",
           "checkerboard_mask", "flatten_sum", "rational_quadratic_spline", "spline_params_per_dim", "vector_mask",
           "zero_log_det"]
