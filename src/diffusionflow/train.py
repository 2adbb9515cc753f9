"""Train a diffusion / flow-matching model: ``python -m diffusionflow.train [overrides]``.

The default config trains the MLP on the embedded 2-D Gaussian mixture in about a minute on 2 CPU
cores and writes to ``logs/train/runs/<date>_<time>/``: the resolved config, CSV metrics, checkpoints,
a samples scatter over the true density and ``metrics.json`` with network-free final metrics.
Sweeps: ``python -m diffusionflow.train -m weighting=edm,sd3,flow,cosine_v``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from diffusionflow.checkpoint import build_module, check_ckpt_path
from diffusionflow.checks import TRAIN, check_config
from diffusionflow.config import ConfigError, instantiate_checked, resolve
from diffusionflow.lightning import interrupt
from diffusionflow.lightning.checkpoint_io import AtomicCheckpointIO, remove_partial_writes
from diffusionflow.lightning.interrupt import RunInterrupted, remove_marker, signal_guard
from diffusionflow.lightning.resume import (
    check_config_change,
    check_nodes_can_meet,
    record_resume,
    resolve_ckpt_path,
)
from diffusionflow.nn.vae import PUBLISHED, resolve_weights
from diffusionflow.paths import CONFIG_PKG
from diffusionflow.plots import plot_weightings
from diffusionflow.reflow import prepare_reflow_pairs  # reflow pairs hook
from diffusionflow.runlock import RunLock
from diffusionflow.tracking import finish_wandb, log_final, setup_wandb

log = logging.getLogger(__name__)

__all__ = ["main", "train", "validate"]


def validate(cfg: DictConfig) -> None:
    """Every value's type and range (``checks.TRAIN``: one ``ConfigError`` naming each bad key, its value
    and what is allowed), then the checks that need more than one group; each component checks its own
    options when built."""
    check_config(cfg, TRAIN)
    num_classes = cfg.data.num_classes
    if cfg.model.guidance != 1.0 and num_classes == 0:
        raise ConfigError(
            f"model.guidance={cfg.model.guidance} needs class labels, but data.num_classes=0 "
            f"(data={cfg.data.train_dataset._target_}); allowed: model.guidance=1.0 or labelled data"
        )
    if cfg.model.label_dropout > 0 and num_classes == 0:
        raise ConfigError(
            f"model.label_dropout={cfg.model.label_dropout} needs labelled data (data.num_classes=0); "
            "allowed: model.label_dropout=0.0"
        )
    why = _augment_refusal(cfg)
    if why is not None:
        raise ConfigError(
            f"model.augment ({cfg.model.augment._target_}): {why}; allowed: augment=none, or image data "
            "(not reflow pairs) with a UNet backbone (unet_tiny, ddpmpp_cifar, adm_imagenet64)"
        )
    vae = cfg.data.get("vae")
    if vae and vae.config in PUBLISHED:  # released weights: a missing file is one the run cannot make
        try:
            resolve_weights(vae.config, vae.get("weights_path"))
        except FileNotFoundError as err:
            raise ConfigError(f"data.vae.weights_path={vae.get('weights_path')}: {err}") from err


def _augment_refusal(cfg: DictConfig) -> str | None:
    """Why ``model.augment`` cannot run with this backbone and data (None when it can, or is off)."""
    if not cfg.model.get("augment"):
        return None
    backbone = cfg.backbone._target_
    if "augment_dim" not in inspect.signature(get_class(backbone)).parameters:
        return f"backbone {backbone} has no augmentation input (augment_dim)"
    if len(cfg.data.shape) != 3:
        return f"data.shape={list(cfg.data.shape)} is not an image"
    if "pairs" in cfg.data.train_dataset:
        return "it would break the pairing of each x with its noise (reflow pairs)"
    return None


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
    check_ckpt_path(cfg.get("ckpt_path"))  # a URL is refused before anything is read or downloaded
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
    # -- resume (diffusionflow.lightning.resume): ckpt_path, or with resume=auto the newest valid checkpoint
    # of the run folder; a refused config change stops here, before anything is written or trained
    ckpt_path = resolve_ckpt_path(cfg.get("resume"), cfg.get("ckpt_path"), out)
    changes = {} if ckpt_path is None else check_config_change(ckpt_path, module.hparams["config"])
    # -- end of resume
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
    check_nodes_can_meet(trainer)
    log.info(
        "components: %s",
        {k: getattr(module, k) for k in ("schedule", "prediction", "weighting", "proposal", "sampler")},
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if ckpt_path is not None and trainer.is_global_zero:
        record_resume(out, ckpt_path, changes)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
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
    """``train`` with the bookkeeping a job needs. Global rank 0 holds the run folder's ``run.lock`` for
    the whole job (one run per folder; a second is refused before it writes anything). A failing job's
    error goes to its folder (``error.log``) before it is re-raised, and W&B is finished after every job.

    A stop signal (SIGTERM from SLURM or ``kill``, SIGINT from Ctrl+C) ends the job with exit status
    ``128 + signum`` (143, 130), never 0: ``callbacks.interrupt`` saves ``checkpoints/last.ckpt`` and
    writes the ``interrupted`` marker; here the marker is written when the signal came outside the fit
    loop, a sweep's folder gets ``sweep_interrupted.json`` naming the jobs not run, and the
    ``SystemExit`` stops Hydra's basic launcher with that status. A job that completes removes an
    ``interrupted`` marker left in its folder by an earlier attempt."""
    out = Path(cfg.paths.output_dir)
    start = time.time()
    lock = RunLock(out) if _global_rank() == 0 and not cfg.get("dry_run") else None
    if lock is not None:
        lock.acquire()  # outside the try below: a refused run writes nothing into the busy folder
        remove_partial_writes(out)  # the lock is ours: no write is in progress in this folder
    try:
        with signal_guard():
            try:
                metrics = train(cfg)
            except (RunInterrupted, SIGTERMException) as stop:
                _stopped(cfg, out, getattr(stop, "signum", None), start)
            except Exception:
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.log").write_text(traceback.format_exc())
                log.exception("the job failed; traceback in %s", out / "error.log")
                raise
            finally:
                finish_wandb()
        if _global_rank() == 0 and not cfg.get("dry_run"):
            remove_marker(out)
    finally:
        if lock is not None:
            lock.release()
    value = metrics.get(cfg.get("optimized_metric") or "", math.nan)
    return None if cfg.get("optimized_metric") is None else value


def _global_rank() -> int:
    """This process's global rank from the launcher's environment (``RANK``, ``SLURM_PROCID``, …), as
    Lightning's ``rank_zero_only`` reads it; 0 for the process that runs ``python -m``."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def _stopped(cfg: DictConfig, out: Path, signum: int | None, start: float) -> NoReturn:
    """After a stop signal: the marker (unless the callback wrote one), the sweep marker in a basic
    multirun, then ``SystemExit(128 + signum)``."""
    signum = signum if signum is not None else interrupt.STATE.signum
    # ddp_spawn: the workers save and write the marker; give them the time to finish
    for child in multiprocessing.active_children():
        child.join(timeout=120)
    marker = out / interrupt.MARKER
    if _global_rank() == 0 and not (marker.exists() and marker.stat().st_mtime >= start):
        interrupt.write_marker(out, signum, None, None)
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hc.launcher.get("_target_")):
        interrupt.write_sweep_marker(Path(hc.sweep.dir), int(hc.job.num), signum)
    raise SystemExit(interrupt.exit_code(signum))


@hydra.main(version_base="1.3", config_path=CONFIG_PKG, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The ``python -m diffusionflow.train`` / ``df-train`` entry point (Hydra), see ``run``."""
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    return run(cfg)


if __name__ == "__main__":
    main()
