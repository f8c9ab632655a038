"""lightning-flows: normalizing flows, CNFs and flow matching beside VAEs, GANs and diffusion."""

__version__ = "0.1.0"
