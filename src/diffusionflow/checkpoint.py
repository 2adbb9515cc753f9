"""Rebuild a ``DiffusionModule`` from a checkpoint of ``diffusionflow.train``.

A checkpoint stores the resolved run config in ``hyper_parameters.config``; the backbone and the core
components are rebuilt from it (and checked) exactly as training built them. With the EMA callback on,
``state_dict`` holds the EMA weights and ``current_model_state`` the raw ones (Lightning's
``WeightAveraging``); without it, ``state_dict`` holds the raw weights and there is no EMA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusionflow.config import build_components, instantiate_checked
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import check_local_path, read_checkpoint
from diffusionflow.lightning.module import DiffusionModule

__all__ = ["WEIGHTS", "build_module", "check_ckpt_path", "check_weights", "load_module"]

WEIGHTS = ("ema", "raw")
RAW_KEY = "current_model_state"
BACKBONE = "backbone."


def check_ckpt_path(path: str | Path | None) -> None:
    """A ``ConfigError`` when ``ckpt_path`` is a URL (or a Lightning registry name), before any work:
    checkpoints are read from local files only, with ``torch.load(weights_only=True)``
    (:func:`~diffusionflow.lightning.checkpoint_io.read_checkpoint`). ``None`` (no resume) passes."""
    if path is not None:
        check_local_path(path, "ckpt_path")


def check_weights(weights: str) -> None:
    """A ``ConfigError`` unless ``weights`` is one of ``WEIGHTS``."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} is unknown; allowed: {list(WEIGHTS)}")


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The untrained ``DiffusionModule`` of a run config: backbone and components built and checked."""
    components = build_components(cfg)
    module: DiffusionModule = instantiate_checked(
        cfg.model,
        "model",
        backbone=instantiate_checked(cfg.backbone, "backbone"),
        schedule=components.schedule,
        prediction=components.prediction,
        weighting=components.weighting,
        proposal=components.proposal,
        sampler=components.sampler,
        num_classes=int(cfg.data.num_classes),
        seed=int(cfg.get("seed") or 0),
    )
    module.hparams["config"] = OmegaConf.to_container(cfg, resolve=True)
    return module


def _weights(ckpt: dict[str, Any], weights: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the chosen weights."""
    if RAW_KEY in ckpt:
        return ckpt["state_dict"] if weights == "ema" else ckpt[RAW_KEY]
    if weights == "ema":
        raise ConfigError(
            f"weights=ema, but {path} has no EMA weights (trained without callbacks.ema); "
            "weights=raw samples with its raw weights"
        )
    return ckpt["state_dict"]


def load_module(
    path: str | Path,
    weights: str = "ema",
    map_location: str | torch.device = "cpu",
    sampler: DictConfig | None = None,
) -> DiffusionModule:
    """The module of checkpoint ``path`` with its ``weights`` (``ema`` or ``raw``), in eval mode on
    ``map_location``. ``sampler`` (a ``conf/sampler`` node) replaces the run's sampler and is checked
    against its schedule and prediction as in training. The file is read with
    :func:`~diffusionflow.lightning.checkpoint_io.read_checkpoint`: local files only, ``weights_only``,
    and a ``ConfigError`` naming the file for anything that is not a checkpoint."""
    check_ckpt_path(path)  # before Path(), which would make "http://x" the local "http:/x"
    path = Path(path)
    check_weights(weights)
    ckpt = read_checkpoint(path, map_location=map_location)
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not config:
        raise ConfigError(
            f"ckpt_path={path} stores no run config (hyper_parameters.config): only checkpoints written by "
            "diffusionflow.train can be rebuilt"
        )
    state = _weights(ckpt, weights, path)
    cfg = OmegaConf.create(config)
    if sampler is not None:
        cfg.sampler = sampler
    module = build_module(cfg)
    module.backbone.load_state_dict(
        {k.removeprefix(BACKBONE): v for k, v in state.items() if k.startswith(BACKBONE)}
    )
    return module.to(map_location).eval()
