"""Where the configs live (inside the package), and the ``df_root`` resolver used by ``conf/paths``.

The Hydra configs ship in the package (``diffusionflow/conf``, searched as ``pkg://diffusionflow.conf``),
so an installed wheel works from any folder. Runs write under ``df_root``: ``$DIFFUSIONFLOW_ROOT`` if
set, else the current directory. Add your own config folder with Hydra's search path, e.g.
``df-train 'hydra.searchpath=[file:///abs/path/to/myconf]' experiment=mine`` (quoted: ``[`` is a
shell glob).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from omegaconf import OmegaConf

__all__ = ["CONFIG_DIR", "CONFIG_PKG", "ROOT_ENV", "replace_atomically", "root_dir"]

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
CONFIG_PKG = "pkg://diffusionflow.conf"
ROOT_ENV = "DIFFUSIONFLOW_ROOT"


def root_dir() -> Path:
    """``$DIFFUSIONFLOW_ROOT``, else the current directory: where ``logs/`` and ``data/`` are."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes ``path`` through a temporary file ``.<name>.*.tmp`` in the same folder: ``write(f)``,
    fsync, rename over ``path``, fsync the folder. Readers see the old file or the new one, never a
    part; a write cut short leaves the old file and a temporary (removed on failure when we can)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every platform can fsync a folder
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


if not OmegaConf.has_resolver("df_root"):
    OmegaConf.register_new_resolver("df_root", lambda: str(root_dir()))
