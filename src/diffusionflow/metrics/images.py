"""Image I/O for metrics: a folder of PNGs or an ``.npz`` of uint8 NHWC images → uint8 NCHW batches.

The two layouts generated samples and reference sets come in: PNG folders (torch-fidelity's input,
read here as it reads them: names sorted, PIL ``convert("RGB")``) and EDM/ADM-style ``.npz`` files
holding one uint8 array (N, H, W, C) under ``samples``, ``arr_0`` or ``images`` (or as the only
array). Batches are numbered from 0 and batch ``i`` goes to rank ``i % world``, so ranks read disjoint
shards that together hold every image exactly once (no padding, unlike ``DistributedSampler``).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.nn.functional import interpolate

from .extractors import to_uint8

__all__ = [
    "ImageSizes",
    "count_images",
    "image_batches",
    "image_sizes",
    "save_png_folder",
    "synthetic_images",
]

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
    return _npz_shape(path)[0]


def _npz_shape(path: Path) -> tuple[int, ...]:
    """The (N, H, W, C) shape of an ``.npz``'s images, from the array header (no data read)."""
    try:
        npz = np.load(path)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err
    with npz:
        key = _npz_key(npz, path)
        try:
            with npz.zip.open(key + ".npy") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = header(f)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err
    _check_nhwc(shape, dtype, path)
    return shape


@dataclass
class ImageSizes:
    """The image sizes of a set: (height, width) → (number of images, an example file)."""

    source: Path
    sizes: dict[tuple[int, int], tuple[int, Path]] = field(default_factory=dict)

    def add(self, size: tuple[int, int], example: Path, count: int = 1) -> None:
        """Counts ``count`` images of ``size``; the first file seen is the size's example."""
        n, first = self.sizes.get(size, (0, example))
        self.sizes[size] = (n + count, first)

    @property
    def count(self) -> int:
        return sum(n for n, _ in self.sizes.values())

    def describe(self) -> str:
        """``16x16 (3 images, e.g. a/000.png), 32x32 (2 images, e.g. a/003.png)``."""
        return ", ".join(
            f"{h}x{w} ({n} image{'s' if n > 1 else ''}, e.g. {example})"
            for (h, w), (n, example) in sorted(self.sizes.items())
        )

    def single(self) -> tuple[int, int]:
        """The one size of the set; a ``ValueError`` listing the sizes found (with an example of each)."""
        if len(self.sizes) != 1:
            raise ValueError(
                f"{self.source}: images of {len(self.sizes)} sizes (height x width): {self.describe()}; "
                "a set must have one size"
            )
        return next(iter(self.sizes))


def image_sizes(source: str | Path) -> ImageSizes:
    """The size of every image of a PNG folder or an ``.npz``, cheaply: each PNG's header (PIL's lazy
    ``Image.open``, no pixels decoded), the array header of an ``.npz``. A file that is not a readable
    image is a ``ValueError`` naming it."""
    path = _source(source)
    out = ImageSizes(path)
    if path.is_dir():
        for file in _png_files(path):
            try:
                with Image.open(file) as image:
                    width, height = image.size
            except UNREADABLE as err:
                raise _unreadable(file, err) from err
            out.add((height, width), file)
        return out
    n, height, width, _ = _npz_shape(path)
    out.add((height, width), path, n)
    return out


def _to_nchw(nhwc: np.ndarray) -> Tensor:
    """uint8 NCHW; grey images get three equal channels, as PIL's ``convert("RGB")`` gives them."""
    x = torch.from_numpy(np.ascontiguousarray(nhwc)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
"""What PIL raises for a file that is not a readable image (truncated, corrupt, not an image)."""


def _unreadable(path: Path, err: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})")


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except UNREADABLE as err:
        raise _unreadable(path, err) from err


def _read_pngs(files: list[Path]) -> Tensor:
    arrays = [_read_png(f) for f in files]
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
