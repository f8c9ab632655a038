"""Callbacks shared by every family."""

from lightning_flows.callbacks.ema import EMACallback
from lightning_flows.callbacks.non_finite import NonFiniteGuard
from lightning_flows.callbacks.sample_grid import SampleGridCallback

__all__ = ["SampleGridCallback", "NonFiniteGuard", "EMACallback"]
