"""Evaluation metrics shared by every family."""

from lightning_flows.metrics.bits_per_dim import bits_per_dim

__all__ = ["bits_per_dim"]
