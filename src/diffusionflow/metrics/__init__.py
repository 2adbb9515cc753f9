"""Metrics: data-space distances for toy data (more to come: Fréchet distances, FID/KID/IS)."""

from .toy import energy_distance, sliced_wasserstein

__all__ = ["energy_distance", "sliced_wasserstein"]
