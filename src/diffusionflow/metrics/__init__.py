"""Metrics: data-space distances for toy data, streaming Fréchet statistics (FID and friends)."""

from .frechet import FrechetStats, frechet_distance
from .toy import energy_distance, sliced_wasserstein

__all__ = ["FrechetStats", "energy_distance", "frechet_distance", "sliced_wasserstein"]
