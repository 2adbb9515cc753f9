"""Fixtures for the image metrics: a random-init Inception weights file and two small PNG image sets.

The real Inception weights cannot be downloaded here, so the parity tests run torch-fidelity and
our wrapper on the same random-init weights (re-drawn He-normal: torch's default init makes every
image's features equal, and any FID ≈ 0). Both sets are seeded smooth random fields, different in
scale of detail and tint, so FID/KID between them are clearly non-zero.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusionflow.metrics.extractors import save_random_inception_weights
from diffusionflow.metrics.images import save_png_folder, synthetic_images

SET_SIZES = {"a": 64, "b": 80}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    return save_random_inception_weights(folder / "random-inception.pth", seed=0)


@pytest.fixture(scope="session")
def image_sets() -> dict[str, torch.Tensor]:
    return {
        "a": synthetic_images(SET_SIZES["a"], seed=1, cells=4, tint=0.0),
        "b": synthetic_images(SET_SIZES["b"], seed=2, cells=8, tint=0.3),
    }


@pytest.fixture(scope="session")
def image_dirs(
    tmp_path_factory: pytest.TempPathFactory, image_sets: dict[str, torch.Tensor]
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    for name, images in image_sets.items():
        save_png_folder(images, root / name)
    return {name: root / name for name in image_sets}
