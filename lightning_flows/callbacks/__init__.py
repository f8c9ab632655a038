"""Callbacks shared by every family."""

from lightning_flows.callbacks.sample_grid import SampleGridCallback

__all__ = ["SampleGridCallback"]
