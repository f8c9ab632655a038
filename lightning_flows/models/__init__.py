"""Generative families behind one interface."""

from lightning_flows.models.base import GenerativeModel, Likelihood
from lightning_flows.models.cnf import CNF
from lightning_flows.models.diffusion import Diffusion
from lightning_flows.models.flow_matching import FlowMatching
from lightning_flows.models.gan import GAN
from lightning_flows.models.glow import Glow
from lightning_flows.models.meanflow import MeanFlow
from lightning_flows.models.nsf import NSF
from lightning_flows.models.realnvp import RealNVP
from lightning_flows.models.tarflow import TarFlow
from lightning_flows.models.vae import VAE

__all__ = ["GenerativeModel", "Likelihood", "FlowMatching", "CNF", "RealNVP", "Glow", "NSF", "VAE", "GAN", "Diffusion",
           "TarFlow", "MeanFlow"]
