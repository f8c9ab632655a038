"""Evaluation metrics shared by every family."""

from lightning_flows.metrics.bits_per_dim import bits_per_dim
from lightning_flows.metrics.energy_distance import energy_distance

__all__ = ["bits_per_dim", "energy_distance"]
