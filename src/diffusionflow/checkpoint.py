"""Rebuild a ``DiffusionModule`` from a checkpoint of ``diffusionflow.train``.

A checkpoint stores the resolved run config in ``hyper_parameters.config``; the backbone and the core
components are rebuilt from it (and checked) exactly as training built them. With the EMA callback on,
``state_dict`` holds the EMA weights and ``current_model_state`` the raw ones (Lightning's
``WeightAveraging``); without it, ``state_dict`` holds the raw weights and there is no EMA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusionflow.config import build_components, instantiate_checked
from diffusionflow.core.posthoc_ema import SIGMA_REL_MAX, check_reconstructable, reconstruct
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import check_local_path, read_checkpoint
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.lightning.posthoc_snapshots import SNAPSHOT_DIR, SNAPSHOT_NAME, STATE_KEY

__all__ = [
    "POSTHOC",
    "WEIGHTS",
    "build_module",
    "check_ckpt_path",
    "check_posthoc",
    "check_weights",
    "load_module",
    "posthoc_sigma_rel",
]

WEIGHTS = ("ema", "raw")
POSTHOC = "sigma_rel:"
"""``weights="sigma_rel:<x>"``: the post-hoc EMA of relative width x (EDM2), reconstructed from the run's
``ema_snapshots/`` (``callbacks.posthoc_ema``)."""
RAW_KEY = "current_model_state"
BACKBONE = "backbone."


def check_ckpt_path(path: str | Path | None) -> None:
    """A ``ConfigError`` when ``ckpt_path`` is a URL (or a Lightning registry name), before any work:
    checkpoints are read from local files only, with ``torch.load(weights_only=True)``
    (:func:`~diffusionflow.lightning.checkpoint_io.read_checkpoint`). ``None`` (no resume) passes."""
    if path is not None:
        check_local_path(path, "ckpt_path")


def posthoc_sigma_rel(weights: str) -> float | None:
    """x of ``weights="sigma_rel:<x>"`` (NaN if x is not a number); None for any other ``weights``."""
    if not (isinstance(weights, str) and weights.startswith(POSTHOC)):
        return None
    try:
        return float(weights.removeprefix(POSTHOC))
    except ValueError:
        return math.nan


def check_weights(weights: str) -> None:
    """A ``ConfigError`` unless ``weights`` is one of ``WEIGHTS`` or ``sigma_rel:<x>`` with x the width of a
    power-function EMA profile (0 < x < 0.3003). Whether a run's snapshots reconstruct that width is
    :func:`check_posthoc`'s question."""
    sigma_rel = posthoc_sigma_rel(weights)
    if sigma_rel is not None and not 0 < sigma_rel < SIGMA_REL_MAX:  # NaN fails too
        raise ConfigError(
            f"weights={weights!r}: allowed 'sigma_rel:<x>' with a number 0 < x < {SIGMA_REL_MAX:.4f} "
            "(the widest power-function EMA profile), e.g. 'sigma_rel:0.1'"
        )
    if sigma_rel is None and weights not in WEIGHTS:
        raise ConfigError(
            f"weights={weights!r} is unknown; allowed: {list(WEIGHTS)} or 'sigma_rel:<x>' (post-hoc EMA of "
            "a run with callbacks.posthoc_ema)"
        )


def _run_dir(path: Path) -> Path:
    """The run folder of a checkpoint: the parent of ``checkpoints/``, else the checkpoint's folder
    (``hpc_ckpt_<n>.ckpt``)."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _posthoc_snapshots(
    ckpt: dict[str, Any], path: Path, sigma_rel: float
) -> tuple[list[tuple[float, float, dict[str, Any]]], float]:
    """(t in images, γ, snapshot) of the run's snapshots up to checkpoint ``path``'s step, and its t: the
    step and t of its ``posthoc_ema`` state. A ``ConfigError`` if there are none or they cannot
    reconstruct ``sigma_rel``. The snapshots are memory-mapped: their weights are read when used."""
    folder = _run_dir(path) / SNAPSHOT_DIR
    state = ckpt.get("callbacks", {}).get(STATE_KEY)
    step = int(state["step"]) if state else int(ckpt.get("global_step", 0))
    files = sorted(
        f
        for f in folder.glob("ema-*.pt")
        if (m := SNAPSHOT_NAME.fullmatch(f.name)) and int(m["step"]) <= step
    )
    if not files or state is None:
        has = "no posthoc_ema state" if files else f"no snapshots up to its step {step} in {folder}"
        raise ConfigError(
            f"weights=sigma_rel:{sigma_rel}: checkpoint {path} has {has}; post-hoc EMA needs a run trained "
            "with callbacks.posthoc_ema (+callbacks@callbacks.posthoc_ema=posthoc_ema)"
        )
    loaded = [read_checkpoint(f, key="ema_snapshot", mmap=True) for f in files]
    snapshots = [(float(s["t_images"]), float(s["gamma"]), s) for s in loaded]
    t_r = float(state["t_images"])
    try:
        check_reconstructable([s[0] for s in snapshots], [s[1] for s in snapshots], t_r, sigma_rel)
    except ConfigError as err:
        raise ConfigError(f"weights=sigma_rel:{sigma_rel} for {path}: {err}") from None
    return snapshots, t_r


def check_posthoc(ckpt_path: str | Path, sigma_rel: float) -> None:
    """A ``ConfigError`` unless the run of ``ckpt_path`` has post-hoc EMA snapshots up to the checkpoint's
    step that reconstruct ``sigma_rel`` (residual at most ``core.posthoc_ema.MAX_RESIDUAL``), naming the
    snapshot folder, or σ_rel, the tracked σ_rels, the residual and the reconstructable range. Reads
    the checkpoint and the snapshots memory-mapped, without loading weights: call it before any work."""
    check_weights(f"{POSTHOC}{sigma_rel}")
    check_ckpt_path(ckpt_path)
    path = Path(ckpt_path)
    _posthoc_snapshots(read_checkpoint(path, mmap=True), path, sigma_rel)


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
    """The state dict of the chosen weights; ``sigma_rel:<x>`` reconstructed from the run's snapshots."""
    sigma_rel = posthoc_sigma_rel(weights)
    if sigma_rel is not None:
        snapshots, t_r = _posthoc_snapshots(ckpt, path, sigma_rel)
        return reconstruct([(t, g, s["state_dict"]) for t, g, s in snapshots], sigma_rel, t_r)
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
    """The module of checkpoint ``path`` with its ``weights`` (``ema``, ``raw``, or ``sigma_rel:<x>``: the
    post-hoc EMA of width x at the checkpoint's step, see :func:`check_posthoc`), in eval mode on
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
