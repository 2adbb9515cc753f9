"""Hydra configs composed as the entry point does, with small, fast settings (LHT's conftest style)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffusionflow.paths import CONFIG_DIR

FAST = [
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "extras.print_config=false",
    "++callbacks.final_eval.num_samples=64",
    "sampler.steps=4",
    "data.batch_size=32",
]


def compose_train(overrides: list[str], tmp_path: Path, fast: bool = True) -> DictConfig:
    """The composed ``train`` config with Hydra's runtime output dir set to ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=(FAST if fast else []) + overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def train_cfg(tmp_path) -> Callable[..., DictConfig]:
    yield lambda overrides=(), **kw: compose_train(list(overrides), tmp_path, **kw)
    GlobalHydra.instance().clear()
