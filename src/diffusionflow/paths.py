"""Where the configs live (inside the package), and the ``df_root`` resolver used by ``conf/paths``.

The Hydra configs ship in the package (``diffusionflow/conf``, searched as ``pkg://diffusionflow.conf``),
so an installed wheel works from any folder. Runs write under ``df_root``: ``$DIFFUSIONFLOW_ROOT`` if
set, else the current directory. Add your own config folder with Hydra's search path, e.g.
``df-train 'hydra.searchpath=[file:///abs/path/to/myconf]' experiment=mine`` (quoted: ``[`` is a
shell glob).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CONFIG_DIR", "CONFIG_PKG", "ROOT_ENV", "root_dir"]

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
CONFIG_PKG = "pkg://diffusionflow.conf"
ROOT_ENV = "DIFFUSIONFLOW_ROOT"


def root_dir() -> Path:
    """``$DIFFUSIONFLOW_ROOT``, else the current directory: where ``logs/`` and ``data/`` are."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()


if not OmegaConf.has_resolver("df_root"):
    OmegaConf.register_new_resolver("df_root", lambda: str(root_dir()))
