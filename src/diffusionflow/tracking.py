"""Weights & Biases for sweeps (users.md: W&B in multiruns).

Each job's run: the resolved config as a plain dict, the sweep's folder name as its group, a tag per
chosen component (``weighting:edm``, ``schedule:cosine``, …, the resolved names, so ``canonical`` shows
what it became), a run id written to the run folder at start (a resumed job continues the same run),
the samples picture and the run's weighting plot as media, and the final metrics in the summary.
Without an API key (or with ``WANDB_MODE=offline``) runs are written offline; ``wandb sync`` uploads
them later.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, open_dict

__all__ = ["finish_wandb", "log_final", "run_id", "run_tags", "setup_wandb", "wandb_mode"]

log = logging.getLogger(__name__)

TAGGED = ("weighting", "schedule", "prediction", "proposal", "sampler")


def wandb_mode() -> str:
    """``WANDB_MODE`` when set, else ``online`` with an API key and ``offline`` without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    return "online" if os.environ.get("WANDB_API_KEY") or wandb.api.api_key is not None else "offline"


def run_id(out_dir: Path) -> str:
    """The W&B run id, written at start so that a resumed job continues the same run."""
    path = out_dir / "wandb_run_id.txt"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:8])
    return path.read_text().strip()


def run_tags(tags: list[str], module: Any, choices: dict[str, Any]) -> list[str]:
    """The config's tags, then ``group:name`` for each component (resolved) and for data and backbone."""
    out = [str(t) for t in tags]
    out += [f"{g}:{getattr(module, g).name}" for g in TAGGED]
    out += [f"{g}:{choices[g]}" for g in ("data", "backbone") if choices.get(g)]
    return list(dict.fromkeys(t[:64] for t in out))  # W&B's tag length limit


def setup_wandb(cfg: DictConfig, module: Any) -> None:
    """Fills ``logger.wandb``: group (the sweep's folder name in a multirun), id (saved at start), tags,
    offline mode without an API key."""
    if "wandb" not in (cfg.get("logger") or {}):
        return
    hc = HydraConfig.get()
    with open_dict(cfg):
        wb = cfg.logger.wandb
        if wb.get("group") is None and hc.mode == RunMode.MULTIRUN:
            wb.group = Path(hc.sweep.dir).name
        if wb.get("id") is None:
            wb.id = run_id(Path(cfg.paths.output_dir))
        if wb.get("resume") is None:
            # a requeued or resumed job in the same folder reads the same id: continue that run
            wb.resume = "allow"
        wb.tags = run_tags(list(wb.get("tags") or []), module, dict(hc.runtime.choices))
        if not wb.offline and wandb_mode() == "offline":
            wb.offline = True
            log.warning(
                "no W&B API key (WANDB_API_KEY or `wandb login`): logging offline; `wandb sync` later"
            )
    log.info("W&B run %s in group %s, tags %s (resume=%s)", wb.id, wb.group, list(wb.tags), wb.resume)


def log_final(loggers: list[Logger], out_dir: Path, metrics: dict[str, float]) -> None:
    """Final metrics into each W&B run's summary; ``samples.png`` and ``weighting.png`` as media."""
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        lg.experiment.summary.update(metrics)
        images = [p for p in ("samples.png", "weighting.png") if (out_dir / p).exists()]
        for name in images:
            lg.log_image(key=f"final/{name[:-4]}", images=[str(out_dir / name)])


def finish_wandb() -> None:
    """Ends the current W&B run, if any (after every sweep job: the next job gets its own run)."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
