"""Metrics: data-space distances for toy data, streaming Fréchet statistics (FID, FD-DINOv2), KID, IS,
precision/recall, and their feature extractors."""

from .extractors import (
    PRETRAINED,
    VGG16,
    WEIGHTS_FILENAME,
    DinoV2,
    FeatureExtractor,
    InceptionV3,
    build_extractor,
    default_weights_path,
    prefetch_inception,
    to_uint8,
)
from .frechet import FrechetStats, frechet_distance
from .images import count_images, image_batches, save_png_folder, synthetic_images
from .kid_is import inception_score, kernel_inception_distance
from .prc import precision_recall
from .reference import reference_stats
from .toy import energy_distance, sliced_wasserstein

__all__ = ["FrechetStats", "energy_distance", "frechet_distance", "sliced_wasserstein"]
__all__ += [
    "PRETRAINED",
    "VGG16",
    "WEIGHTS_FILENAME",
    "DinoV2",
    "FeatureExtractor",
    "InceptionV3",
    "build_extractor",
    "count_images",
    "default_weights_path",
    "image_batches",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "prefetch_inception",
    "reference_stats",
    "save_png_folder",
    "synthetic_images",
    "to_uint8",
]
