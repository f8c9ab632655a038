"""Callbacks shared by every family."""

from lightning_flows.callbacks.ema import EMACallback
from lightning_flows.callbacks.evaluation import (BitsPerDimCallback, EvaluationCallback, EvaluationSchedule,
                                                  FIDCallback, SamplingCostCallback)
from lightning_flows.callbacks.non_finite import NonFiniteGuard
from lightning_flows.callbacks.replicas import DistributedReplicas
from lightning_flows.callbacks.sample_grid import SampleGridCallback
from lightning_flows.callbacks.seeding import PerStepSeed
from lightning_flows.callbacks.training_timer import TrainingTimer

__all__ = ["SampleGridCallback", "NonFiniteGuard", "EMACallback", "EvaluationCallback", "EvaluationSchedule",
           "FIDCallback", "BitsPerDimCallback", "SamplingCostCallback", "TrainingTimer", "PerStepSeed",
           "DistributedReplicas"]
