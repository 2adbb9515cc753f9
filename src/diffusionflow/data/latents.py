"""Latents of an image data set, as ``python -m diffusionflow.encode`` writes them, read memory-mapped.

A latent folder holds

* ``latents.npy``: float32 (N, C, h, w), the VAE posterior means m(x) (:mod:`diffusionflow.nn.vae`), *not*
  normalised: the normalisation is applied when read, so one folder serves both;
* ``labels.npy``: int64 (N,), class indices, −1 for an unlabelled source;
* ``meta.json``: what made them and how to read them (:data:`META_KEYS`): the VAE config name and the
  SHA-256 of its weights file, ``normalisation`` (``edm2`` | ``sd``) with its per-channel ``mean`` and
  ``std`` (z = (m(x) − mean)/std), ``data_mean``/``data_std`` (per-channel statistics of m(x) over all N
  rows, from which ``edm2`` is computed), the VAE's ``scaling_factor`` (for ``sd``), ``image_resolution``,
  ``latent_shape``, ``flip_copies`` (each image also encoded mirrored: rows 2i and 2i+1), ``source``,
  ``count`` = N, ``num_classes`` and ``done``, true once every row is written.

:class:`LatentDataset` maps ``latents.npy`` (``np.load(mmap_mode="r")``, opened in each process on first
use, so workers never receive a copy): only the rows read are paged in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusionflow.errors import ConfigError
from diffusionflow.nn.vae import latent_stats

__all__ = ["LABELS", "LATENTS", "META", "META_KEYS", "LatentDataset", "read_meta"]

LATENTS, LABELS, META = "latents.npy", "labels.npy", "meta.json"
META_KEYS = (
    "vae",
    "vae_weights_sha256",
    "normalisation",
    "mean",
    "std",
    "data_mean",
    "data_std",
    "scaling_factor",
    "image_resolution",
    "latent_shape",
    "flip_copies",
    "source",
    "count",
    "num_classes",
    "done",
)
ENCODE = "python -m diffusionflow.encode --input <images> --out"


def read_meta(root: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of the latent folder ``root``; a FileNotFoundError naming it and the command
    that writes it when absent."""
    path = Path(root).expanduser() / META
    if not path.is_file():
        raise FileNotFoundError(
            f"latent folder {path.parent} has no {META}: write it with `{ENCODE} {path.parent}`"
        )
    meta = json.loads(path.read_text())
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not written by diffusionflow.encode")
    return meta


class LatentDataset(Dataset):
    """The latents of ``root`` as ``(z, y)``: z float32 (C, h, w) = (m(x) − mean)/std, y int64 (0 for an
    unlabelled folder, which has ``num_classes`` 0).

    Args:
        root: the latent folder.
        expect_vae: the VAE config the experiment decodes with; a folder encoded by another is refused.
        normalisation: ``edm2`` | ``sd``; None: the folder's own.
    """

    def __init__(
        self, root: str | Path, expect_vae: str | None = None, normalisation: str | None = None
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        meta = read_meta(self.root)
        if not meta["done"]:
            raise ConfigError(
                f"latent folder {self.root}: meta.json has done=false (the encoding stopped early); rerun "
                f"the same `python -m diffusionflow.encode ... --out {self.root}` command to finish it"
            )
        if expect_vae is not None and meta["vae"] != expect_vae:
            raise ConfigError(
                f"latent folder {self.root} was encoded with vae={meta['vae']!r}, but the experiment's "
                f"vae.config={expect_vae!r}: encode the images with --vae {expect_vae} or set vae.config"
            )
        self.meta = meta
        self.normalisation = normalisation or meta["normalisation"]
        if self.normalisation == meta["normalisation"]:
            mean, std = meta["mean"], meta["std"]
        else:
            mean, std = latent_stats(
                self.normalisation, meta["data_mean"], meta["data_std"], meta["scaling_factor"]
            )
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.shape: tuple[int, ...] = tuple(meta["latent_shape"])
        self.num_classes = int(meta["num_classes"])
        self.count = int(meta["count"])
        for name, shape in ((LATENTS, (self.count, *self.shape)), (LABELS, (self.count,))):
            found = np.load(self.root / name, mmap_mode="r").shape
            if found != shape:
                raise ValueError(f"{self.root / name} has shape {found}, meta.json says {shape}")
        self._latents: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its maps (a worker process opens its own)."""
        return {**self.__dict__, "_latents": None, "_labels": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self._latents is None or self._labels is None:
            self._latents = np.load(self.root / LATENTS, mmap_mode="r", allow_pickle=False)
            self._labels = np.load(self.root / LABELS, mmap_mode="r", allow_pickle=False)
        z = (torch.from_numpy(np.array(self._latents[index])) - self.mean) / self.std
        label = int(self._labels[index]) if self.num_classes else 0
        return z, torch.tensor(label, dtype=torch.int64)
