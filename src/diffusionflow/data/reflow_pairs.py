"""Reflow pairs as a dataset: reads the ``.npz`` that ``diffusionflow.reflow.make_reflow_pairs``
wrote (Liu et al. 2022, reflow); it makes nothing.

``ReflowPairs`` is a dataset of the ``diffusionflow.data`` contract (a zero-argument factory for
``DiffusionDataModule`` through ``_partial_: true``) whose items are ``(x, y, noise)``: the model trains
on z_t = α_t x + σ_t noise. ``shape`` and ``num_classes`` are the pairs'; ``reference_samples`` and
``mixture`` are those of the parent's own training set, rebuilt from the data config stored in the file,
so that evaluation compares with the parent's data law.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from diffusionflow.errors import ConfigError

__all__ = ["PROVENANCE", "ReflowPairs"]

KEY = "data.train_dataset"
PROVENANCE = ("parent_sha256", "weights", "sampler", "t_grid", "seed", "num_pairs", "noise_rule")
"""What made the pairs, as stored in the file (strings)."""


class ReflowPairs(Dataset):
    """The pairs of the file ``path``: items ``(x, y, noise)``.

    Args:
        path: the ``.npz`` of ``make_reflow_pairs``; ``python -m diffusionflow.train`` sets it from
            ``pairs``.
        pairs: the settings the entry point makes ``path`` from (``make_reflow_pairs``'s arguments);
            read here only to say what to set when ``path`` is missing.
    """

    def __init__(self, path: str | None = None, pairs: Mapping[str, Any] | None = None) -> None:
        if path is None:
            parent = (pairs or {}).get("parent_ckpt")
            raise ConfigError(
                f"{KEY}.path=null and {KEY}.pairs.parent_ckpt={'null' if parent is None else parent}: "
                "the pairs file is made by the entry point; train a parent first "
                "(`python -m diffusionflow.train`), then `python -m diffusionflow.train "
                f"experiment=reflow_toy2d {KEY}.pairs.parent_ckpt=<parent run>/checkpoints/last.ckpt`"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{KEY}.path={path}: no such file (made by diffusionflow.reflow)")
        with np.load(self.path) as f:
            self.x, self.y, self.noise = (torch.from_numpy(f[k]) for k in ("x", "y", "noise"))
            self.num_classes = int(f["num_classes"])
            self.parent_ckpt = Path(str(f["parent_ckpt"]))
            self.parent_data: dict[str, Any] = json.loads(str(f["parent_data"]))
            self.provenance = {k: str(f[k]) for k in PROVENANCE if k in f}
        self.shape: tuple[int, ...] = tuple(self.x.shape[1:])
        self.weights = self.provenance.get("weights", "ema")

    @cached_property
    def parent_law(self) -> Any:
        """The parent's training set, rebuilt from its data config (built on first use)."""
        return instantiate(OmegaConf.create(self.parent_data))()

    @property
    def mixture(self) -> Any:
        """The parent data's exact Gaussian mixture, or None."""
        return getattr(self.parent_law, "mixture", None)

    def reference_samples(self, n: int, seed: int) -> Tensor:
        """Fresh points of the parent's data law (its training set's ``reference_samples``)."""
        return self.parent_law.reference_samples(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[index], self.y[index], self.noise[index]
