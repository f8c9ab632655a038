"""Generative families behind one interface."""

from lightning_flows.models.base import GenerativeModel, Likelihood
from lightning_flows.models.flow_matching import FlowMatching

__all__ = ["GenerativeModel", "Likelihood", "FlowMatching"]
