"""Train a diffusion / flow-matching model: ``python -m diffusionflow.train [overrides]``.

The default config trains the MLP on the embedded 2-D Gaussian mixture in about a minute on 2 CPU
cores and writes to ``logs/train/runs/<date>_<time>/``: the resolved config, CSV metrics, checkpoints,
a samples scatter over the true density and ``metrics.json`` with network-free final metrics.
Sweeps: ``python -m diffusionflow.train -m weighting=edm,sd3,flow,cosine_v``.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from diffusionflow.checkpoint import build_module
from diffusionflow.config import ConfigError, instantiate_checked, resolve
from diffusionflow.lightning.checkpoint_io import AtomicCheckpointIO
from diffusionflow.paths import CONFIG_PKG
from diffusionflow.plots import plot_weightings
from diffusionflow.reflow import prepare_reflow_pairs  # reflow pairs hook
from diffusionflow.tracking import finish_wandb, log_final, setup_wandb

log = logging.getLogger(__name__)

__all__ = ["main", "train", "validate"]


def validate(cfg: DictConfig) -> None:
    """Checks that need more than one group; each component checks its own values when built."""
    num_classes = int(cfg.data.num_classes)
    if cfg.model.guidance != 1.0 and num_classes == 0:
        raise ConfigError(
            f"model.guidance={cfg.model.guidance} needs class labels, but data.num_classes=0 "
            f"(data={cfg.data.train_dataset._target_}); allowed: model.guidance=1.0 or labelled data"
        )
    if not 0 <= cfg.model.label_dropout < 1:
        raise ConfigError(f"model.label_dropout={cfg.model.label_dropout} must be in [0, 1)")
    if cfg.model.label_dropout > 0 and num_classes == 0:
        raise ConfigError(
            f"model.label_dropout={cfg.model.label_dropout} needs labelled data (data.num_classes=0)"
        )
    for key in ("max_steps", "max_epochs"):
        value = cfg.trainer.get(key)
        if value is not None and value < -1:
            raise ConfigError(f"trainer.{key}={value} must be >= -1 (-1: no limit)")


def _instantiate_dict(node: DictConfig | None, key: str) -> list[Any]:
    """Every entry with a ``_target_`` in a dict of configs (``callbacks``, ``logger``)."""
    if not node:
        return []
    return [
        instantiate_checked(sub, f"{key}.{name}")
        for name, sub in node.items()
        if isinstance(sub, DictConfig) and "_target_" in sub
    ]


def train(cfg: DictConfig) -> dict[str, float]:
    """Builds everything from ``cfg`` (failing fast on bad values), fits, evaluates; returns metrics.

    ``canonical`` components are resolved first (``config.resolve``): the printed config, the run folder's
    ``config_resolved.yaml`` and the checkpoints' stored config name the schedule, prediction and
    proposal that run. ``dry_run=true`` stops after everything is built and checked."""
    validate(cfg)
    cfg = resolve(cfg)
    if cfg.get("print_config"):
        log.info("config (canonical components resolved):\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    # -- reflow pairs hook (diffusionflow.reflow): the pairs file is made before the data that reads it
    cfg = prepare_reflow_pairs(cfg)
    # -- end of reflow pairs hook
    module = build_module(cfg)
    datamodule = instantiate_checked(cfg.data, "data")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(module.hparams["config"]))
    if cfg.get("dry_run"):
        log.info("dry_run: every component built and checked; nothing trained")
        return {}
    setup_wandb(cfg, module)
    callbacks: list[Callback] = _instantiate_dict(cfg.get("callbacks"), "callbacks")
    loggers: list[Logger] = _instantiate_dict(cfg.get("logger"), "logger")
    trainer: Trainer = instantiate_checked(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    log.info(
        "components: %s",
        {k: getattr(module, k) for k in ("schedule", "prediction", "weighting", "proposal", "sampler")},
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        lo, hi = module.bin_edges[0].item(), module.bin_edges[-1].item()
        plot_weightings(
            [(module.weighting.name, module.weighting, module.proposal)], out / "weighting.png", (lo, hi)
        )
        log_final(loggers, out, metrics)
    return metrics


def run(cfg: DictConfig) -> float | None:
    """``train`` with the bookkeeping a sweep needs: the error of a failing job goes to its folder
    (``error.log``) before it is re-raised, and W&B is finished after every job."""
    try:
        metrics = train(cfg)
    except Exception:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.log").write_text(traceback.format_exc())
        log.exception("the job failed; traceback in %s", out / "error.log")
        raise
    finally:
        finish_wandb()
    value = metrics.get(cfg.get("optimized_metric") or "", math.nan)
    return None if cfg.get("optimized_metric") is None else value


@hydra.main(version_base="1.3", config_path=CONFIG_PKG, config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    return run(cfg)


if __name__ == "__main__":
    main()
