"""Where the project's configs live, and the ``df_root`` resolver used by ``conf/paths``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CONFIG_DIR", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"
if not (CONFIG_DIR / "train.yaml").exists():
    raise FileNotFoundError(
        f"diffusionflow's configs are not at {CONFIG_DIR}: install the package from its source tree "
        "(pip install -e .), as the README does"
    )

if not OmegaConf.has_resolver("df_root"):
    OmegaConf.register_new_resolver("df_root", lambda: str(PROJECT_ROOT))
