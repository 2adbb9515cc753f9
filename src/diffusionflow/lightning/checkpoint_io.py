"""Checkpoints written atomically, refused when not finite, and read without unpickling code.

Writing: to a temporary file in the same folder, fsync, then rename. ``os.replace`` is atomic on POSIX,
so a crash during a save leaves the previous ``last.ckpt`` intact (Lightning's own
``TorchCheckpointIO`` writes the target file in place). A checkpoint whose weights (``state_dict``, or
the raw ones in ``current_model_state`` under EMA) hold a NaN or an infinity is never written: the
save raises :class:`~diffusionflow.lightning.finite_guard.NonFiniteError` and the previous file stays.

Reading (:func:`read_checkpoint`, also what ``Trainer.fit(ckpt_path=...)`` calls through
:meth:`AtomicCheckpointIO.load_checkpoint`): local files only — a URL is refused, where Lightning would
download it and unpickle it with ``weights_only=False`` — and always ``torch.load(...,
weights_only=True)``, which admits tensors and plain containers only. A file that is not a checkpoint
(garbage, truncated, a pickle of other objects) is a ``ConfigError`` that says so.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from diffusionflow.errors import ConfigError
from diffusionflow.lightning.finite_guard import NonFiniteError
from diffusionflow.paths import replace_atomically

__all__ = [
    "AtomicCheckpointIO",
    "check_local_path",
    "non_finite_entries",
    "read_checkpoint",
    "remove_partial_writes",
]

log = logging.getLogger(__name__)

WEIGHT_KEYS = ("state_dict", "current_model_state")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Lines of torch's weights_only error that give advice (retry with weights_only=False), not a reason.
ADVICE = re.compile(r"weights_only|Weights only|trusted source|documentation of torch\.load|file an issue")


def check_local_path(path: str | Path, key: str = "ckpt_path") -> None:
    """A ``ConfigError`` if ``path`` is a URL (``scheme://…``) or a Lightning model-registry name: only
    local checkpoint files are read (Lightning would download either and unpickle it unrestricted)."""
    text = str(path)
    if URL.match(text) or text.lower() == "registry" or text.lower().startswith("registry:"):
        raise ConfigError(
            f"{key}={text} is not a local file: checkpoints are read from local paths only, never "
            "downloaded; allowed: a path to a .ckpt written by diffusionflow.train (download it yourself, "
            "from a source you trust, and pass its path)"
        )


def _reason(err: BaseException) -> str:
    """A short reason for a failed ``torch.load``, without torch's advice to retry unrestricted."""
    if isinstance(err, pickle.UnpicklingError):
        lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(err).splitlines()]
        detail = " ".join(line for line in lines if line and not ADVICE.search(line))
        return f"it holds objects other than tensors and plain containers, which are not loaded ({detail})"
    if isinstance(err, EOFError):
        return "the file is empty or ends too early (truncated)"
    if isinstance(err, RuntimeError) and "mmap can only be used" in str(err):
        return "not a file written by torch.save (no zip archive)"
    if isinstance(err, RuntimeError | zipfile.BadZipFile) and "zip" in str(err):
        return f"truncated or corrupted ({str(err).split('. ')[0]})"
    return f"not a file written by torch.save ({type(err).__name__}: {err})"


def read_checkpoint(
    path: str | Path,
    map_location: str | torch.device | Callable | None = "cpu",
    key: str = "ckpt_path",
    mmap: bool = False,
    need_state_dict: bool = True,
) -> dict[str, Any]:
    """The checkpoint dict at the local ``path``, read with ``torch.load(weights_only=True)`` (and
    ``mmap``: tensors memory-mapped, read when used). ``key`` names the setting in messages;
    ``need_state_dict``: a training checkpoint (with ``state_dict``), not any dict of tensors.

    Raises ``ConfigError`` for a URL and for a file that is not a checkpoint (``"{key}=<path> is not a
    checkpoint of diffusionflow.train: <reason>"``), ``FileNotFoundError`` for a missing file."""
    check_local_path(path, key)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        # ``from None``: the chained error would repeat torch's advice to load with weights_only=False.
        raise ConfigError(
            f"{key}={path} is not a checkpoint of diffusionflow.train: {_reason(err)}"
        ) from None
    if not isinstance(ckpt, dict) or (need_state_dict and not isinstance(ckpt.get("state_dict"), Mapping)):
        what = (
            f"a dict without a state_dict (keys {sorted(map(str, ckpt))[:8]})"
            if isinstance(ckpt, dict)
            else f"a {type(ckpt).__name__}, not a dict"
        )
        raise ConfigError(f"{key}={path} is not a checkpoint of diffusionflow.train: it holds {what}")
    return ckpt


def non_finite_entries(checkpoint: Mapping[str, Any]) -> list[str]:
    """``key['name']`` of every floating tensor of the checkpoint's weights that holds a NaN or an ∞."""
    named = [
        (f"{key}[{name!r}]", value)
        for key in WEIGHT_KEYS
        if isinstance(checkpoint.get(key), Mapping)
        for name, value in checkpoint[key].items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()
    ]
    if not named:
        return []
    flags = [torch.isfinite(t.detach()).all() for _, t in named]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # one synchronisation
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Deletes the temporary files of checkpoint writes that a kill cut short (``.<name>.*.tmp`` in
    ``run_dir`` and its ``checkpoints/``) and returns them. Call it only while holding the folder's
    ``run.lock``: then no write is in progress."""
    run_dir = Path(run_dir)
    partial = sorted({*run_dir.glob(".*.ckpt.*.tmp"), *run_dir.glob("checkpoints/.*.ckpt.*.tmp")})
    for path in partial:
        path.unlink(missing_ok=True)
        log.warning(
            "removed %s: a checkpoint write cut short by a kill (the file it was to replace is intact)", path
        )
    return partial


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, finite-only writes and restricted local reads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        """Writes ``checkpoint`` to ``path`` atomically; raises ``NonFiniteError`` (nothing written) if its
        weights are not finite."""
        path = Path(path)
        bad = non_finite_entries(checkpoint)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise NonFiniteError(
                f"refusing to write checkpoint {path}: {', '.join(bad[:3])}{more} hold NaN or infinite "
                f"values (the training diverged); the previous {path.name}, if any, is left as it was"
            )
        replace_atomically(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | str | torch.device | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """:func:`read_checkpoint`: local files only, always ``weights_only=True`` (a ``weights_only=False``
        request is not honoured: nothing here unpickles arbitrary objects). Any dict of tensors passes:
        Lightning also reads its own files through here (``ddp_spawn``'s ``.temp.ckpt`` of the weights)."""
        return read_checkpoint(path, map_location=map_location, need_state_dict=False)
