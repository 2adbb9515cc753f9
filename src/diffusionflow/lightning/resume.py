"""Resuming a run in its own folder: which checkpoint, and which config changes a resume accepts.

**Which checkpoint** (``resume=auto``). The candidates are ``<run>/checkpoints/*.ckpt`` (``last.ckpt``,
``step_*.ckpt``) and Lightning's SLURM requeue checkpoints ``<run>/hpc_ckpt_*.ckpt``. A candidate is
valid when ``torch.load(path, map_location="cpu", weights_only=True)`` reads it (memory-mapped, so no
tensor is read) and it has ``state_dict``, ``global_step`` and ``loops``; a truncated or foreign file is
skipped with a warning naming it. The newest is the one with the largest ``global_step``, ties going to
the latest modification time. No valid candidate: the run starts fresh.

**Config changes** (every resume, ``resume=auto`` or ``ckpt_path=``). The checkpoint stores the
resolved run config (``hyper_parameters.config``); it is compared leaf by leaf with the current one.

- *Refused* (a ``ConfigError`` before anything trains, listing ``key: old → new``): what the restored
  state would silently override, or what makes the run no longer one run — ``model.*`` (optimizer, its
  state is restored; lr scheduler; label dropout), ``backbone.*``, ``weighting``, ``schedule``,
  ``prediction``, ``proposal`` (the adaptive one has state), ``sampler`` (the run's own measurements),
  ``data.*``, ``seed``, ``callbacks.ema.*`` (the EMA state is restored) and
  ``callbacks.posthoc_ema.sigma_rels`` (the profiles are restored). Exceptions, which do not
  change what is computed: ``data.num_workers``, ``data.pin_memory``, ``data.persistent_workers``,
  ``model.compile``, ``model.channels_last`` and any ``data.*.root`` (where the same files are).
- *Applied and recorded*: everything else — ``trainer.*`` (``max_steps``/``max_epochs``, devices,
  logging frequency), ``callbacks.*`` other than ``ema`` (checkpoint frequency, FID), ``logger``,
  ``paths``, ``tags``, ``ckpt_path``, ``resume``, ``print_config`` … Each such change is logged and
  appended to ``<run>/resumes.jsonl`` (one line per resume: checkpoint, step, ``{key: [old, new]}``),
  since the checkpoints written after the resume store only the new config. ``hydra`` is not compared.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import read_checkpoint

__all__ = [
    "REFUSED",
    "REFUSED_EXCEPT",
    "changed_keys",
    "check_config_change",
    "check_nodes_can_meet",
    "find_newest_checkpoint",
    "is_valid_checkpoint",
    "record_resume",
    "resolve_ckpt_path",
]

log = logging.getLogger(__name__)

RESUME_OPTIONS = (None, "auto")
REQUIRED_KEYS = ("state_dict", "global_step", "loops")
# Config prefixes whose change a resume refuses (a prefix matches the key itself and its sub-keys).
REFUSED = (
    "model",
    "backbone",
    "weighting",
    "schedule",
    "prediction",
    "proposal",
    "sampler",
    "data",
    "seed",
    "callbacks.ema",
    "callbacks.posthoc_ema.sigma_rels",
)
# Keys under a refused prefix that may change: how data is loaded and how the network is compiled.
REFUSED_EXCEPT = (
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "model.compile",
    "model.channels_last",
)
NOT_COMPARED = ("hydra",)
ABSENT = "<absent>"


def _load(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, memory-mapped (tensors are not read until used)."""
    return read_checkpoint(path, map_location="cpu", mmap=True)


def is_valid_checkpoint(path: str | Path) -> tuple[bool, int]:
    """(valid, global_step): whether ``path`` loads with ``weights_only=True`` and holds the keys a
    resume needs (``state_dict``, ``global_step``, ``loops``); a warning names a file that does not."""
    path = Path(path)
    try:
        ckpt = _load(path)
    except Exception as err:  # truncated, garbage, not a torch file: skip it, whatever the reason
        rank_zero_warn(f"resume: skipping {path}: it does not load ({type(err).__name__}: {err})")
        return False, -1
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        rank_zero_warn(f"resume: skipping {path}: no {', '.join(missing)} (not a training checkpoint)")
        return False, -1
    return True, int(ckpt["global_step"])


def _candidates(run_dir: Path) -> list[Path]:
    return sorted({*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")})


def find_newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The valid checkpoint of ``run_dir`` with the largest ``global_step`` (ties: latest mtime), or
    None when it has none (a fresh start)."""
    best: tuple[int, float, Path] | None = None
    for path in _candidates(Path(run_dir)):
        valid, step = is_valid_checkpoint(path)
        if valid:
            key = (step, path.stat().st_mtime, path)
            best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else best[2]


def resolve_ckpt_path(resume: str | None, ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from: ``ckpt_path`` when given, else with ``resume=auto``
    the newest valid one in ``run_dir`` (None: start fresh), else None."""
    if resume not in RESUME_OPTIONS:
        raise ConfigError(f"resume={resume!r} is unknown; allowed: null (only ckpt_path) or 'auto'")
    if ckpt_path is not None:
        if resume == "auto":
            log.info("resume=auto: ckpt_path=%s is given, so it is used", ckpt_path)
        return str(ckpt_path)
    if resume != "auto":
        return None
    newest = find_newest_checkpoint(run_dir)
    if newest is None:
        log.info("resume=auto: no valid checkpoint in %s, starting fresh", run_dir)
        return None
    log.info("resume=auto: continuing from %s", newest)
    return str(newest)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of nested dicts; lists are compared as values."""
    if isinstance(node, Mapping) and (node or not prefix):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _refused(key: str) -> bool:
    if _under(key, REFUSED_EXCEPT) or (key.startswith("data.") and key.endswith(".root")):
        return False
    return _under(key, REFUSED)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every leaf that differs (``<absent>`` where one side lacks it)."""
    a, b = _flatten(old), _flatten(new)
    return {
        k: (a.get(k, ABSENT), b.get(k, ABSENT))
        for k in sorted(a.keys() | b.keys())
        if not _under(k, NOT_COMPARED) and a.get(k, ABSENT) != b.get(k, ABSENT)
    }


def _fmt(value: Any) -> str:
    return value if value == ABSENT else repr(value)


def check_config_change(ckpt_path: str | Path, config: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The changes from the checkpoint's stored config to ``config`` that a resume applies; a
    ``ConfigError`` listing ``key: old → new`` when one of them is refused (module docstring)."""
    ckpt = _load(Path(ckpt_path))
    stored = (ckpt.get("hyper_parameters") or {}).get("config")
    if not stored:
        rank_zero_warn(f"resume: {ckpt_path} stores no run config; config changes cannot be checked")
        return {}
    changes = changed_keys(stored, config)
    refused = {k: v for k, v in changes.items() if _refused(k)}
    if refused:
        lines = "\n".join(f"  {k}: {_fmt(o)} → {_fmt(n)}" for k, (o, n) in refused.items())
        raise ConfigError(
            f"resuming from {ckpt_path} with changed settings that the restored state would override or "
            f"that would make it another run:\n{lines}\nallowed: the values stored in the checkpoint for "
            f"{', '.join(REFUSED)} (except {', '.join(REFUSED_EXCEPT)}, data.*.root); start a new run "
            "(another run_name or folder) to change them"
        )
    return changes


def record_resume(run_dir: str | Path, ckpt_path: str | Path, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Log the applied changes and append one line to ``<run_dir>/resumes.jsonl``."""
    ckpt = _load(Path(ckpt_path))
    step = int(ckpt["global_step"])
    for k, (old, new) in changes.items():
        log.info("resume: %s: %s → %s (applied)", k, _fmt(old), _fmt(new))
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ckpt_path": str(ckpt_path),
        "global_step": step,
        "changed": {k: [old, new] for k, (old, new) in changes.items()},
    }
    with (Path(run_dir) / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def check_nodes_can_meet(trainer: Trainer) -> None:
    """A ``ConfigError`` when ``trainer.num_nodes > 1`` but nothing starts the other nodes: no cluster
    (SLURM, torchelastic, …) was detected and ``NODE_RANK`` / ``MASTER_ADDR`` are not set, so the ranks
    would wait for the missing nodes until the process-group timeout instead of failing."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    manual = {"NODE_RANK", "MASTER_ADDR"} <= os.environ.keys()
    if trainer.num_nodes > 1 and isinstance(env, LightningEnvironment) and not manual:
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes}, but no cluster starts the other nodes here; allowed: "
            "launcher=submitit_slurm (or another SLURM / torchrun launch), NODE_RANK and MASTER_ADDR set "
            "on every node, or trainer.num_nodes=1"
        )
