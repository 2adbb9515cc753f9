"""Image I/O for metrics: a folder of PNGs or an ``.npz`` of uint8 NHWC images → uint8 NCHW batches.

The two layouts generated samples and reference sets come in: PNG folders (torch-fidelity's input,
read here as it reads them: names sorted, PIL ``convert("RGB")``) and EDM/ADM-style ``.npz`` files
holding one uint8 array (N, H, W, C) under ``samples``, ``arr_0`` or ``images`` (or as the only
array). Batches are numbered from 0 and batch ``i`` goes to rank ``i % world``, so ranks read disjoint
shards that together hold every image exactly once (no padding, unlike ``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn.functional import interpolate

from .extractors import to_uint8

__all__ = ["count_images", "image_batches", "save_png_folder", "synthetic_images"]

NPZ_KEYS = ("samples", "arr_0", "images")


def _png_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ValueError(f"no .png files in {folder}")
    return files


def _npz_key(npz: np.lib.npyio.NpzFile, path: Path) -> str:
    names = list(npz.files)
    key = next((k for k in NPZ_KEYS if k in names), names[0] if len(names) == 1 else None)
    if key is None:
        raise ValueError(f"{path} holds arrays {names}: expected one of {NPZ_KEYS} or a single array")
    return key


def _check_nhwc(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        hint = " (it looks NCHW; store NHWC as EDM does)" if len(shape) == 4 and shape[1] in (1, 3) else ""
        raise ValueError(
            f"{path}: expected a uint8 array (N, H, W, C) with C in (1, 3), got {dtype} {shape}{hint}"
        )


def _load_npz(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        array = npz[_npz_key(npz, path)]
    _check_nhwc(array.shape, array.dtype, path)
    return array


def _source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".npz"):
        return path
    raise ValueError(f"{path}: expected a folder of .png files or a .npz file of uint8 NHWC images")


def count_images(source: str | Path) -> int:
    """Number of images in a PNG folder or an ``.npz`` (read from the array header, not the data)."""
    path = _source(source)
    if path.is_dir():
        return len(_png_files(path))
    with np.load(path) as npz, npz.zip.open(_npz_key(npz, path) + ".npy") as f:
        fmt = np.lib.format
        header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = header(f)
    _check_nhwc(shape, dtype, path)
    return shape[0]


def _to_nchw(nhwc: np.ndarray) -> Tensor:
    """uint8 NCHW; grey images get three equal channels, as PIL's ``convert("RGB")`` gives them."""
    x = torch.from_numpy(np.ascontiguousarray(nhwc)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def _read_pngs(files: list[Path]) -> Tensor:
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"PNGs of different sizes in one batch ({sorted(shapes)}), from {files[0].parent}")
    return _to_nchw(np.stack(arrays))


def image_batches(
    source: str | Path, batch_size: int = 64, rank: int = 0, world: int = 1, limit: int | None = None
) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches of the first ``limit`` (default all) images of ``source``, this
    rank's share: batches ``rank``, ``rank + world``, … of ``batch_size`` images each (the last may be
    smaller). ``functools.partial(image_batches, source, batch_size)`` is the ``(rank, world)``
    callable that :func:`~diffusionflow.metrics.reference.reference_stats` takes."""
    path = _source(source)
    files = _png_files(path) if path.is_dir() else None
    array = None if files is not None else _load_npz(path)
    total = len(files) if files is not None else len(array)
    if limit is not None:
        if limit > total:
            raise ValueError(f"{path} holds {total} images, fewer than the {limit} requested")
        total = limit
    for start in range(rank * batch_size, total, world * batch_size):
        stop = min(start + batch_size, total)
        yield _read_pngs(files[start:stop]) if files is not None else _to_nchw(array[start:stop])


def save_png_folder(images: Tensor, folder: str | Path, start: int = 0) -> list[Path]:
    """Writes uint8 (N, C, H, W) images (C = 1 or 3) as ``folder/{start + i:06d}.png``, lossless."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1 or 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        paths.append(folder / f"{start + i:06d}.png")
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(paths[-1])
    return paths


def synthetic_images(n: int, seed: int, cells: int = 4, tint: float = 0.0, size: int = 32) -> Tensor:
    """Seeded smooth random images for offline tests and benchmarks, uint8 (n, 3, size, size):
    tanh of (cells × cells) Gaussian noise upsampled bicubically, plus ``tint``. Sets that differ in
    ``cells`` (scale of detail) or ``tint`` (colour) are different distributions."""
    z = torch.randn(n, 3, cells, cells, generator=torch.Generator().manual_seed(seed))
    return to_uint8(torch.tanh(interpolate(z, size=size, mode="bicubic", align_corners=False) + tint))
