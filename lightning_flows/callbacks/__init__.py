"""Callbacks shared by every family."""

from lightning_flows.callbacks.bits_per_dim import BitsPerDimCallback
from lightning_flows.callbacks.ema import EMACallback
from lightning_flows.callbacks.fid import FIDCallback
from lightning_flows.callbacks.non_finite import NonFiniteGuard
from lightning_flows.callbacks.replicas import DistributedReplicas
from lightning_flows.callbacks.sample_grid import SampleGridCallback
from lightning_flows.callbacks.sampling_cost import SamplingCostCallback
from lightning_flows.callbacks.seeding import PerStepSeed

__all__ = ["SampleGridCallback", "NonFiniteGuard", "EMACallback", "FIDCallback", "BitsPerDimCallback",
           "SamplingCostCallback", "PerStepSeed", "DistributedReplicas"]
