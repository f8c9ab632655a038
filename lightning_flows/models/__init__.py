"""Generative families behind one interface."""

from lightning_flows.models.base import GenerativeModel, Likelihood
from lightning_flows.models.flow_matching import FlowMatching
from lightning_flows.models.glow import Glow
from lightning_flows.models.realnvp import RealNVP

__all__ = ["GenerativeModel", "Likelihood", "FlowMatching", "RealNVP", "Glow"]
