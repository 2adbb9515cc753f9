"""scikit-learn's bundled 8×8 handwritten digits (``sklearn.datasets.load_digits``; the UCI "Optical
Recognition of Handwritten Digits" test set, Alpaydin & Kaynak 1998): 1797 grey images, values 0..16,
10 classes. Ships with scikit-learn, so it works offline and makes a fast image benchmark.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.nn.functional import interpolate

from .transforms import TensorPairs, check_choice

__all__ = ["Digits"]

N_IMAGES = 1797


class Digits(TensorPairs):
    """Digits as float32 (1, r, r) in [-1, 1] (0 ↦ −1, 16 ↦ 1) with labels 0..9.

    Args:
        split: ``train`` (the first ``n_train`` images of a permutation drawn with ``split_seed``) or
            ``test`` (the other 1797 − n_train).
        resolution: 8 (native), 16 or 32. Upscaling uses ``torch.nn.functional.interpolate`` with
            ``upscale="bilinear"`` (align_corners=False: smooth, values stay in [-1, 1]) or
            ``"nearest"`` (blocky, keeps the 17 grey levels).
        hflip: random left-right mirroring; off by default, digits are not mirror-symmetric.
    """

    def __init__(
        self,
        split: str = "train",
        resolution: int = 8,
        upscale: str = "bilinear",
        n_train: int = 1500,
        split_seed: int = 0,
        hflip: bool = False,
    ) -> None:
        check_choice("split", split, ("train", "test"))
        check_choice("resolution", resolution, (8, 16, 32))
        check_choice("upscale", upscale, ("bilinear", "nearest"))
        if not 0 < n_train < N_IMAGES:
            raise ValueError(f"data option n_train={n_train} must be in 1..{N_IMAGES - 1}")
        digits = load_digits()
        images = torch.from_numpy(digits.images).to(torch.float32)[:, None] / 8 - 1
        if resolution != 8:
            align = False if upscale == "bilinear" else None
            images = interpolate(images, size=resolution, mode=upscale, align_corners=align)
        order = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(split_seed))
        self.indices = order[:n_train] if split == "train" else order[n_train:]
        labels = torch.from_numpy(digits.target)
        super().__init__(images[self.indices], labels[self.indices], num_classes=10, hflip=hflip)
