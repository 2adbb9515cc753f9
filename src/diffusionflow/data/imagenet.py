"""ImageNet (ILSVRC-2012, Russakovsky et al. 2015) at low resolution, from one of two layouts.

* ``format="npz"``: Downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled
  Variant of ImageNet as an Alternative to the CIFAR datasets"), the files of
  ``Imagenet{32,64}_train_npz`` and ``Imagenet{32,64}_val_npz`` unpacked into one folder:
  ``train_data_batch_1.npz`` … ``train_data_batch_10.npz`` and ``val_data.npz``. Each holds ``data``,
  uint8 (N, 3·r·r) with the red, green and blue planes one after the other (a row reshapes to CHW),
  and ``labels`` in 1..1000, returned here as 0..999. Their class order is the one of the dataset's
  own label map (ILSVRC devkit order), not sorted WNIDs. An npz member cannot be memory-mapped (it
  sits inside a zip archive, possibly compressed), so the first use of a split copies its images, in
  chunks, into one uint8 ``.npy`` beside them (``<root>/mmap/<split>_<r>px.npy``, 3.9 GB for train at
  32 px, 15.7 GB at 64 px, once per folder; a file lock keeps concurrent ranks from converting twice)
  with a manifest (``.json``: the sources' names, sizes and modification times, and the file's SHA-256,
  verified on every load; a stale or corrupt copy is rebuilt). Reads then memory-map it: a process's
  memory holds the labels and the pages it touched, not the split.
* ``format="folder"``: the usual ``<root>/<split>/<wnid>/*.JPEG`` tree read with torchvision's
  ``ImageFolder`` (classes = sorted WNIDs) and decoded on the fly, resized with ADM's centre crop
  (:func:`~diffusionflow.data.transforms.adm_center_crop`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusionflow.paths import replace_atomically

from .transforms import (
    TensorPairs,
    adm_center_crop,
    check_choice,
    default_hflip,
    file_sha256,
    random_hflip,
    require_files,
    to_unit_range,
)

__all__ = ["ImageNetFolder", "ImageNetNpz", "imagenet_dataset", "memory_mapped_npz"]

log = logging.getLogger(__name__)

NUM_CLASSES = 1000
SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 26  # rows copied per read while converting: 64 MB


def npz_files(split: str) -> list[str]:
    """The Downsampled-ImageNet file names of ``split``."""
    return [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]


def _npy_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of the ``.npy`` stream (left at the first data byte)."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{where}: .npy format version {version} is not supported")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if fortran_order:
        raise ValueError(f"{where}: Fortran-ordered data is not supported")
    return shape, dtype


def _sources(folder: Path, names: list[str]) -> list[list[Any]]:
    """The npz files as the cache manifest records them: name, size, modification time (ns)."""
    return [[name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in names]


def _cached(path: Path, manifest: Path, key: dict[str, Any]) -> bool:
    """``path`` holds the images of ``key`` (its manifest matches) and its SHA-256 is the recorded one."""
    if not (path.is_file() and manifest.is_file()):
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if {k: recorded.get(k) for k in key} != key:
        return False
    if file_sha256(path) == recorded.get("sha256"):
        return True
    log.warning(
        f"{path} does not match the SHA-256 in {manifest.name} (corrupted or truncated): rebuilding it"
    )
    return False


def _convert(
    folder: Path, names: list[str], rows: int, width: int, path: Path, manifest: Path, key: dict
) -> None:
    """Copies the ``data`` member of each npz file into one (rows, width) uint8 ``.npy``, in chunks,
    through a temporary file renamed into place; then writes the manifest."""
    log.info(f"converting {len(names)} npz files in {folder} to the memory-mappable {path} (once)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, width))
        start, step = 0, max(1, CHUNK_BYTES // width)
        for name in names:
            with zipfile.ZipFile(folder / name) as archive, archive.open("data.npy") as stream:
                (count, _), _ = _npy_header(stream, str(folder / name))
                for first in range(0, count, step):
                    n = min(step, count - first)
                    chunk = np.frombuffer(stream.read(n * width), dtype=np.uint8).reshape(n, width)
                    out[start + first : start + first + n] = chunk
            start += count
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {**key, "sha256": file_sha256(path)}
    replace_atomically(manifest, lambda f: f.write(json.dumps(record, indent=1).encode()))


def memory_mapped_npz(folder: Path, names: list[str], resolution: int) -> np.ndarray:
    """The ``data`` members of the npz files ``names`` in ``folder``, one after the other, as a read-only
    (copy-on-write) memory map of uint8 (N, 3·r·r), converted once into ``folder/mmap/``."""
    width = 3 * resolution**2
    rows = 0
    for name in names:
        with zipfile.ZipFile(folder / name) as archive, archive.open("data.npy") as stream:
            shape, dtype = _npy_header(stream, str(folder / name))
        if len(shape) != 2 or shape[1] != width or dtype != np.uint8:
            raise ValueError(
                f"{folder / name} holds rows of {shape[-1]} bytes = 3·r·r with r = "
                f"{int((shape[-1] / 3) ** 0.5)}, but resolution={resolution}"
            )
        rows += shape[0]
    cache = folder / "mmap"
    cache.mkdir(exist_ok=True)
    stem = f"{names[0].split('_data')[0]}_{resolution}px"
    path, manifest = cache / f"{stem}.npy", cache / f"{stem}.json"
    key = {"sources": _sources(folder, names), "resolution": resolution, "rows": rows}
    with open(cache / f".{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter; the others wait, then find it done
        if not _cached(path, manifest, key):
            _convert(folder, names, rows, width, path, manifest, key)
    return np.load(path, mmap_mode="c", allow_pickle=False)


class ImageNetNpz(TensorPairs):
    """Downsampled ImageNet from its npz files in ``root``: float32 (3, r, r) in [-1, 1], labels 0..999;
    the images memory-mapped (:func:`memory_mapped_npz`)."""

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
            with np.load(folder / name, allow_pickle=False) as f:
                labels.append(torch.from_numpy(f["labels"].astype(np.int64)) - 1)
        y = torch.cat(labels)
        if y.min() < 0 or y.max() >= NUM_CLASSES:
            low, high = y.min().item() + 1, y.max().item() + 1
            raise ValueError(f"labels in {folder} must lie in 1..{NUM_CLASSES}, got {low}..{high}")
        x = torch.from_numpy(memory_mapped_npz(folder, names, resolution))
        if len(x) != len(y):
            raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels")
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
