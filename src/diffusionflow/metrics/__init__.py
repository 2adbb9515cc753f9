"""Metrics: data-space distances for toy data, streaming Fréchet statistics (FID and friends)."""

from .extractors import (
    WEIGHTS_FILENAME,
    FeatureExtractor,
    InceptionV3,
    default_weights_path,
    prefetch_inception,
    to_uint8,
)
from .frechet import FrechetStats, frechet_distance
from .images import count_images, image_batches, save_png_folder, synthetic_images
from .kid_is import inception_score, kernel_inception_distance
from .reference import reference_stats
from .toy import energy_distance, sliced_wasserstein

__all__ = ["FrechetStats", "energy_distance", "frechet_distance", "sliced_wasserstein"]
__all__ += [
    "WEIGHTS_FILENAME",
    "FeatureExtractor",
    "InceptionV3",
    "count_images",
    "default_weights_path",
    "image_batches",
    "inception_score",
    "kernel_inception_distance",
    "prefetch_inception",
    "reference_stats",
    "save_png_folder",
    "synthetic_images",
    "to_uint8",
]
