"""Pieces shared by the datasets: pixel scaling, random flips, ADM resizing, the in-memory (x, y)
dataset, the offline file check and option validation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "TensorPairs",
    "adm_center_crop",
    "check_choice",
    "default_hflip",
    "file_sha256",
    "random_hflip",
    "require_files",
    "to_unit_range",
]


def check_choice(key: str, value: object, allowed: Sequence[object]) -> None:
    """Raise a ValueError naming the config key and its allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"data option {key}={value!r} is not allowed; choose one of {list(allowed)}")


def require_files(folder: Path, names: Iterable[str], how: str) -> None:
    """Raise FileNotFoundError naming ``folder``, the missing and expected files, and ``how`` to get them."""
    names = list(names)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset files missing in {folder}: {', '.join(missing)} "
            f"(expected there: {', '.join(names)}). To get them: {how}"
        )


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """The SHA-256 hex digest of the file ``path``, read in chunks (memory stays at ``chunk`` bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 pixels 0..255 → float32 in [-1, 1] (0 ↦ −1, 255 ↦ 1)."""
    return x.to(torch.float32) / 127.5 - 1.0


def random_hflip(x: Tensor) -> Tensor:
    """Mirror a (..., H, W) image left-right with probability ½ (torch's global RNG, which the
    DataLoader seeds per worker from its generator)."""
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def default_hflip(hflip: bool | None, split: str) -> bool:
    """Random flips default to on for the training split and off otherwise."""
    return split == "train" if hflip is None else hflip


def adm_center_crop(image: Image.Image, size: int) -> Tensor:
    """ADM's resize (Dhariwal & Nichol 2021, guided-diffusion ``center_crop_arr``; EDM's
    ``--transform=center-crop-dhariwal``): halve with a box filter while the short side is ≥ 2·size,
    resize bicubically so the short side is ``size``, then crop the centre. Returns uint8 (3, size, size)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return torch.from_numpy(arr[top : top + size, left : left + size].copy()).permute(2, 0, 1)


class TensorPairs(Dataset):
    """(x, y) pairs held in memory. ``x`` is float32 already in its final range, or uint8 pixels that
    are scaled to [-1, 1] when read; ``y`` are int64 class indices. ``hflip`` mirrors images at random."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, hflip: bool = False) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x = x
        self.y = y.to(torch.int64)
        self.num_classes = num_classes
        self.hflip = hflip
        self.shape: tuple[int, ...] = tuple(x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.x[index]
        if x.dtype == torch.uint8:
            x = to_unit_range(x)
        return (random_hflip(x) if self.hflip else x), self.y[index]
