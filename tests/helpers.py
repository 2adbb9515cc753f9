"""Helpers shared by the tests (a module, not a conftest: conftest names collide across folders)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor

from diffusionflow.core.oracle import GaussianMixture
from diffusionflow.metrics import FeatureExtractor
from diffusionflow.paths import CONFIG_DIR


def make_mixture(dim: int = 2, components: int = 3, seed: int = 0) -> GaussianMixture:
    """A seeded mixture with full covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(components, dim, generator=g, dtype=torch.float64)
    a = torch.randn(components, dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    covs = 0.3 * a @ a.transpose(-1, -2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, covs, weights)


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """A script of ``scripts/`` as a module (not a package: its scripts import each other by name)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


class MeanStd(FeatureExtractor):
    """Per-channel mean and standard deviation of the pixels: 6 features."""

    name = "mean-std"
    feature_dim = 6

    def forward(self, images: Tensor) -> Tensor:
        x = images.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def compose_sample(overrides: list[str]) -> DictConfig:
    """The composed ``sample`` config, with Hydra's config set as the entry point has it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("sample", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg
