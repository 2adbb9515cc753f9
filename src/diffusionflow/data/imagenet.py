"""ImageNet (ILSVRC-2012, Russakovsky et al. 2015) at low resolution, from one of two layouts.

* ``format="npz"``: Downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled
  Variant of ImageNet as an Alternative to the CIFAR datasets"), the files of
  ``Imagenet{32,64}_train_npz`` and ``Imagenet{32,64}_val_npz`` unpacked into one folder:
  ``train_data_batch_1.npz`` … ``train_data_batch_10.npz`` and ``val_data.npz``. Each holds ``data``,
  uint8 (N, 3·r·r) with the red, green and blue planes one after the other (a row reshapes to CHW),
  and ``labels`` in 1..1000, returned here as 0..999. Their class order is the one of the dataset's
  own label map (ILSVRC devkit order), not sorted WNIDs. The whole split is held in memory as uint8:
  3.9 GB for train at 32 px, 15.7 GB at 64 px (per process).
* ``format="folder"``: the usual ``<root>/<split>/<wnid>/*.JPEG`` tree read with torchvision's
  ``ImageFolder`` (classes = sorted WNIDs) and decoded on the fly, resized with ADM's centre crop
  (:func:`~diffusionflow.data.transforms.adm_center_crop`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import (
    TensorPairs,
    adm_center_crop,
    check_choice,
    default_hflip,
    random_hflip,
    require_files,
    to_unit_range,
)

__all__ = ["ImageNetFolder", "ImageNetNpz", "imagenet_dataset"]

NUM_CLASSES = 1000
SPLITS = ("train", "val")


def npz_files(split: str) -> list[str]:
    """The Downsampled-ImageNet file names of ``split``."""
    return [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]


class ImageNetNpz(TensorPairs):
    """Downsampled ImageNet from its npz files in ``root``: float32 (3, r, r) in [-1, 1], labels 0..999."""

    def __init__(
        self, root: str | Path, resolution: int = 64, split: str = "train", hflip: bool | None = None
    ) -> None:
        check_choice("split", split, SPLITS)
        folder = Path(root).expanduser().resolve()
        names = npz_files(split)
        require_files(
            folder,
            names,
            how=f"download the Downsampled ImageNet {resolution}x{resolution} archives "
            f"(Imagenet{resolution}_train*_npz.zip, Imagenet{resolution}_val_npz.zip) from "
            f"https://image-net.org/download-images (needs an account) and unpack the .npz files "
            f"into {folder}/",
        )
        labels = []
        for name in names:
            with np.load(folder / name) as f:
                labels.append(torch.from_numpy(f["labels"].astype(np.int64)) - 1)
        y = torch.cat(labels)
        if y.min() < 0 or y.max() >= NUM_CLASSES:
            low, high = y.min().item() + 1, y.max().item() + 1
            raise ValueError(f"labels in {folder} must lie in 1..{NUM_CLASSES}, got {low}..{high}")
        x = torch.empty((len(y), 3 * resolution**2), dtype=torch.uint8)  # filled in place: no 2nd copy
        start = 0
        for name in names:
            with np.load(folder / name) as f:
                data = f["data"]
            if data.shape[1] != x.shape[1]:
                raise ValueError(
                    f"{folder / name} holds rows of {data.shape[1]} bytes = 3·r·r with r = "
                    f"{int((data.shape[1] / 3) ** 0.5)}, but resolution={resolution}"
                )
            x[start : start + len(data)] = torch.from_numpy(data)
            start += len(data)
        x = x.view(-1, 3, resolution, resolution)
        super().__init__(x, y, num_classes=NUM_CLASSES, hflip=default_hflip(hflip, split))


class ImageNetFolder(Dataset):
    """ImageNet from ``<root>/<split>/<wnid>/*.JPEG``, ADM-cropped to float32 (3, r, r) in [-1, 1];
    labels index the sorted class folders."""

    def __init__(
        self, root: str | Path, resolution: int = 64, split: str = "train", hflip: bool | None = None
    ) -> None:
        from torchvision.datasets import ImageFolder

        check_choice("split", split, SPLITS)
        folder = Path(root).expanduser().resolve() / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {folder} not found: expected {folder}/<wnid>/*.JPEG (e.g. "
                f"{folder}/n01440764/). ImageNet needs an account at https://image-net.org/download-images; "
                f"unpack ILSVRC2012_img_{split}.tar into one folder per class under {folder}/"
            )
        self.images = ImageFolder(str(folder))
        self.resolution = resolution
        self.hflip = default_hflip(hflip, split)
        self.shape = (3, resolution, resolution)
        self.num_classes = len(self.images.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.images[index]
        x = to_unit_range(adm_center_crop(image, self.resolution))
        return (random_hflip(x) if self.hflip else x), torch.tensor(label, dtype=torch.int64)


def imagenet_dataset(
    root: str | Path,
    resolution: int = 64,
    split: str = "train",
    format: str = "npz",
    hflip: bool | None = None,
) -> ImageNetNpz | ImageNetFolder:
    """ImageNet at ``resolution`` px from the ``npz`` (Downsampled ImageNet) or ``folder`` layout in ``root``;
    ``hflip`` None means random flips for train only."""
    check_choice("format", format, ("npz", "folder"))
    layout = ImageNetNpz if format == "npz" else ImageNetFolder
    return layout(root, resolution=resolution, split=split, hflip=hflip)
