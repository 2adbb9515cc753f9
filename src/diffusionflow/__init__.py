"""diffusionflow: train and compare diffusion and flow-matching models."""

__version__ = "0.1.0"
