"""Encode an image folder into VAE latents: ``python -m diffusionflow.encode`` (``df-encode``).

    python -m diffusionflow.encode --input IMAGES --out LATENTS [--vae sd-vae-ft-ema] [--vae-weights FILE]
        [--resolution 256] [--flip-copies] [--normalisation edm2|sd] [--batch-size 64] [--device cuda]
    torchrun --nproc_per_node 8 -m diffusionflow.encode ...     (the same folder, split over 8 GPUs)

``IMAGES`` is an ImageNet-style tree ``<root>/<class>/*.JPEG`` (labels index the sorted class folders, as
torchvision's ``ImageFolder``) or a flat folder of images (labels −1). Each image is resized with ADM's
centre crop (:func:`~diffusionflow.data.transforms.adm_center_crop`; images not in RGB mode — grayscale,
CMYK, palette, RGBA — are converted with PIL's ``convert("RGB")`` as ADM does, and counted), scaled to
[−1, 1] and encoded to the posterior mean of the VAE, in float32 and eval mode; with ``--flip-copies`` its
mirror image is encoded too (EDM2's x-flip augmentation made offline): rows 2i and 2i+1. The result is a
latent folder (:mod:`diffusionflow.data.latents`), read by ``LatentDataset``.

The images are encoded in fixed *blocks* of ``--batch-size`` images (block k: images kB … kB+B−1), one
forward pass per block, so what a row holds never depends on how the work was split: under torchrun rank r
encodes the blocks k ≡ r (mod world size). ``latents.npy`` and ``labels.npy`` are preallocated; after each
block its rows are flushed to disk and the rank's ``progress-<rank>.npy`` (per block: done, images
converted, per-channel Σm and Σm²) is replaced atomically. A killed run, rerun with the same arguments (any
number of processes), encodes only the blocks not yet done, and its files equal an uninterrupted run's byte
for byte. At the end rank 0 sums the per-block statistics in block order into the data mean and standard
deviation of m(x) over all rows (the ``edm2`` normalisation), writes ``meta.json`` with ``done: true`` and
removes the progress files.

Refused before any work (``error: ...``, exit status 2): an input without images, an existing ``--out``
made from other images or with another VAE, weights, resolution, flip or normalisation (naming both).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusionflow.data.latents import LABELS, LATENTS, META
from diffusionflow.data.transforms import adm_center_crop, file_sha256, to_unit_range
from diffusionflow.distributed import Ranks, barrier, close_ranks, init_ranks
from diffusionflow.errors import ConfigError
from diffusionflow.nn.vae import (
    NORMALISATIONS,
    VAE_CONFIGS,
    latent_shape,
    latent_stats,
    load_autoencoder,
    resolve_weights,
)
from diffusionflow.paths import replace_atomically

__all__ = ["Job", "build_parser", "cli", "encode_block", "list_images", "main", "make_latents"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
PROGRESS = "progress-{rank}.npy"
KEY = (
    "vae",
    "vae_weights_sha256",
    "image_resolution",
    "flip_copies",
    "normalisation",
    "source",
    "images",
    "source_files_sha256",
)
"""The meta.json entries a rerun into the same ``--out`` must match (and ``batch_size`` while unfinished)."""


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files and the subfolders of ``folder``, sorted by name (``os.scandir``: no stat per file)."""
    with os.scandir(folder) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    images = [Path(e.path) for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    return images, [Path(e.path) for e in entries if e.is_dir()]


def list_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """The images under ``root``, their labels and the class names: ``<root>/<class>/<image>`` with the
    class folders sorted by name (label = index), or ``<root>/<image>`` with label −1; names sorted."""
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root} is not a folder")
    top, folders = _scan(root)
    per_class = {folder.name: _scan(folder)[0] for folder in folders}
    classes = [name for name, files in per_class.items() if files]
    if classes and top:
        raise ConfigError(
            f"--input {root} holds both images ({top[0].name}, ...) and class folders ({classes[0]}/, ...): "
            "give a flat folder of images or one folder per class"
        )
    if not classes and not top:
        raise ConfigError(
            f"--input {root} holds no images ({', '.join(IMAGE_SUFFIXES)}), neither directly nor in class "
            "folders <input>/<class>/"
        )
    if top:
        return top, [-1] * len(top), []
    files = [f for name in classes for f in per_class[name]]
    labels = [i for i, name in enumerate(classes) for _ in per_class[name]]
    return files, labels, classes


@dataclass(frozen=True)
class Job:
    """What one encoding makes: the images, the VAE and its weights, and how they are encoded."""

    source: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]
    vae: str
    weights: Path
    weights_sha256: str
    resolution: int
    flip_copies: bool
    normalisation: str
    batch_size: int

    @property
    def copies(self) -> int:
        return 2 if self.flip_copies else 1

    @property
    def blocks(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(VAE_CONFIGS[self.vae], (3, self.resolution, self.resolution))

    def block_images(self, k: int) -> range:
        return range(k * self.batch_size, min((k + 1) * self.batch_size, len(self.files)))

    def key(self) -> dict[str, Any]:
        names = "\n".join(str(f.relative_to(self.source)) for f in self.files)
        return {
            "vae": self.vae,
            "vae_weights_sha256": self.weights_sha256,
            "image_resolution": self.resolution,
            "flip_copies": self.flip_copies,
            "normalisation": self.normalisation,
            "source": str(self.source),
            "images": len(self.files),
            "source_files_sha256": hashlib.sha256(names.encode()).hexdigest(),
            "batch_size": self.batch_size,
        }


class _Images(Dataset):
    """(uint8 (3, r, r) ADM-cropped pixels, 1 if the file was not RGB) for each image file."""

    def __init__(self, files: Sequence[Path], resolution: int) -> None:
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.files[index]) as image:
            return adm_center_crop(image, self.resolution), int(image.mode != "RGB")


def encode_block(autoencoder: Any, images: Tensor) -> np.ndarray:
    """The posterior means m(x) of ``images`` (NCHW in [−1, 1]) as float32 on the CPU."""
    return autoencoder.encode(images).latent_dist.mean.float().cpu().numpy()


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """cuDNN in deterministic mode without autotuning, no TF32: the same block gives the same bits."""
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved


# ---- the latent folder -------------------------------------------------------------------------------
def _save_npy(path: Path, array: np.ndarray) -> None:
    replace_atomically(path, lambda f: np.save(f, array, allow_pickle=False))


def _check_existing(out: Path, job: Job) -> dict[str, Any] | None:
    """The meta.json of an existing ``out`` if it was made by this job, else None when there is none;
    a ConfigError naming both values of each entry that differs."""
    path = out / META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    key = job.key()
    names = [*KEY] if meta.get("done") else [*KEY, "batch_size"]
    differ = [
        f"{name}: {meta.get(name)!r} there, {key[name]!r} here"
        for name in names
        if meta.get(name) != key[name]
    ]
    if differ:
        raise ConfigError(
            f"--out {out} holds latents made otherwise ({'; '.join(differ)}): choose another --out, or "
            "delete it to encode again"
        )
    return meta


def _meta(job: Job, stats: np.ndarray | None) -> dict[str, Any]:
    """meta.json: the job's key, the format's entries and, given the summed progress ``stats``, the
    statistics of m(x) and the normalisation they give (None while unfinished)."""
    channels, height, width = job.latent_shape
    scaling = float(VAE_CONFIGS[job.vae]["scaling_factor"])
    meta: dict[str, Any] = {
        **job.key(),
        "weights_file": str(job.weights),
        "scaling_factor": scaling,
        "latent_shape": list(job.latent_shape),
        "count": len(job.files) * job.copies,
        "num_classes": len(job.classes),
        "classes": job.classes,
        "done": stats is not None,
        **dict.fromkeys(("data_mean", "data_std", "mean", "std", "converted_to_rgb")),
    }
    if stats is not None:
        values = meta["count"] * height * width
        data_mean = stats[2 : 2 + channels] / values
        data_std = np.sqrt(np.maximum(stats[2 + channels :] / values - data_mean**2, 0.0))
        mean, std = latent_stats(job.normalisation, data_mean.tolist(), data_std.tolist(), scaling)
        meta.update(
            data_mean=data_mean.tolist(),
            data_std=data_std.tolist(),
            mean=mean,
            std=std,
            converted_to_rgb=int(stats[1]),
        )
    return meta


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    replace_atomically(out / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _create(out: Path, job: Job) -> None:
    """Empty latent files (``latents.npy`` preallocated, sparse) and ``meta.json`` with done false."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(PROGRESS.format(rank="*")):
        stale.unlink()
    count = len(job.files) * job.copies
    _save_npy(out / LABELS, np.repeat(np.asarray(job.labels, dtype=np.int64), job.copies))
    fd, tmp = tempfile.mkstemp(prefix=f".{LATENTS}.", suffix=".tmp", dir=out)
    os.close(fd)
    latents = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, *job.latent_shape))
    latents.flush()
    del latents
    os.replace(tmp, out / LATENTS)
    _write_meta(out, _meta(job, None))


def _read_progress(out: Path, job: Job) -> np.ndarray:
    """Per block: done, images converted to RGB, Σm and Σm² per channel — the union of every rank's file."""
    progress = np.zeros((job.blocks, 2 + 2 * job.latent_shape[0]))
    for path in sorted(out.glob(PROGRESS.format(rank="*"))):
        theirs = np.load(path, allow_pickle=False)
        if theirs.shape != progress.shape:
            raise ValueError(f"{path} has shape {theirs.shape}, expected {progress.shape}: delete {out}")
        progress = np.where(theirs[:, :1] > 0, theirs, progress)
    return progress


def make_latents(job: Job, out: Path, ranks: Ranks, workers: int = 0) -> Path:
    """Encodes ``job`` into the latent folder ``out`` (resuming an unfinished one) on this rank's blocks;
    rank 0 finishes ``meta.json``. Returns ``out``."""
    meta = _check_existing(out, job)
    if meta is not None and meta["done"]:
        log.info(f"{out}: already complete ({meta['count']} latents)")
        return out
    if ranks.is_main and meta is None:
        _create(out, job)
    barrier(ranks)
    progress = _read_progress(out, job)
    mine = [k for k in range(ranks.rank, job.blocks, ranks.world) if not progress[k, 0]]
    log.info(
        f"rank {ranks.rank}/{ranks.world}: {len(mine)} blocks of {job.batch_size} images to encode "
        f"({int(progress[:, 0].sum())} of {job.blocks} blocks already done)"
    )
    autoencoder = load_autoencoder(job.vae, job.weights).to(ranks.device)
    loader = DataLoader(
        _Images(job.files, job.resolution),
        batch_sampler=[list(job.block_images(k)) for k in mine],
        num_workers=workers,
    )
    latents = np.lib.format.open_memmap(out / LATENTS, mode="r+")
    progress_file = out / PROGRESS.format(rank=ranks.rank)
    bar = tqdm(total=sum(len(job.block_images(k)) for k in mine), unit="img", disable=not ranks.is_main)
    with _exact_float32(), torch.inference_mode(), bar:
        for k, (pixels, converted) in zip(mine, loader, strict=True):
            x = to_unit_range(pixels).to(ranks.device)
            if job.flip_copies:
                x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
            m = encode_block(autoencoder, x)
            rows = slice(job.block_images(k).start * job.copies, job.block_images(k).stop * job.copies)
            latents[rows] = m
            latents.flush()
            m64 = m.astype(np.float64)
            progress[k] = [1, int(converted.sum()), *m64.sum(axis=(0, 2, 3)), *(m64**2).sum(axis=(0, 2, 3))]
            _save_npy(progress_file, progress)
            bar.update(len(pixels))
    del latents
    barrier(ranks)
    if ranks.is_main:
        _finish(out, job)
    barrier(ranks)
    return out


def _finish(out: Path, job: Job) -> None:
    """meta.json with the statistics of all blocks (summed in block order) and done true."""
    progress = _read_progress(out, job)
    missing = np.flatnonzero(progress[:, 0] == 0)
    if len(missing):
        raise RuntimeError(f"{out}: blocks {missing[:10].tolist()} were not encoded; rerun the same command")
    meta = _meta(job, progress.sum(axis=0))
    _write_meta(out, meta)
    for path in out.glob(PROGRESS.format(rank="*")):
        path.unlink()
    if meta["converted_to_rgb"]:
        log.warning(f"{meta['converted_to_rgb']} of {len(job.files)} images were not RGB: converted with PIL")
    log.info(f"{out}: {meta['count']} latents {job.latent_shape}, data mean {meta['data_mean']}")


# ---- command line ------------------------------------------------------------------------------------
def _job(args: argparse.Namespace) -> Job:
    """The job of the command line, every argument checked before any work."""
    if args.vae not in VAE_CONFIGS:
        raise ConfigError(f"--vae {args.vae}: allowed {sorted(VAE_CONFIGS)}")
    if VAE_CONFIGS[args.vae]["in_channels"] != 3:
        raise ConfigError(
            f"--vae {args.vae} takes {VAE_CONFIGS[args.vae]['in_channels']}-channel images; encode reads RGB "
            "image folders (allowed: a VAE with in_channels 3)"
        )
    if args.normalisation not in NORMALISATIONS:
        raise ConfigError(f"--normalisation {args.normalisation}: allowed {list(NORMALISATIONS)}")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1 and --workers {args.workers} >= 0")
    try:
        latent_shape(VAE_CONFIGS[args.vae], (3, args.resolution, args.resolution))
    except ValueError as err:
        raise ConfigError(f"--resolution {args.resolution}: {err}") from err
    source = Path(args.input).expanduser().resolve()
    files, labels, classes = list_images(source)
    weights = resolve_weights(args.vae, args.vae_weights).resolve()
    return Job(
        source=source,
        files=files,
        labels=labels,
        classes=classes,
        vae=args.vae,
        weights=weights,
        weights_sha256=file_sha256(weights),
        resolution=args.resolution,
        flip_copies=args.flip_copies,
        normalisation=args.normalisation,
        batch_size=args.batch_size,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusionflow.encode", description="Encode an image folder into VAE latents."
    )
    parser.add_argument(
        "--input", required=True, help="<root>/<class>/*.JPEG (ImageNet train) or a flat folder"
    )
    parser.add_argument("--out", required=True, help="the latent folder (resumed if unfinished)")
    parser.add_argument("--vae", default="sd-vae-ft-ema", help=f"one of {sorted(VAE_CONFIGS)}")
    parser.add_argument(
        "--vae-weights", help="weights file or diffusers folder (default: the torch.hub cache)"
    )
    parser.add_argument("--resolution", type=int, default=256, help="image side after the ADM centre crop")
    parser.add_argument("--flip-copies", action="store_true", help="also encode each image mirrored (EDM2)")
    parser.add_argument("--normalisation", default="edm2", help=f"one of {list(NORMALISATIONS)}")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (and per block)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoders")
    parser.add_argument(
        "--device", help="cuda (each torchrun process takes its own) or cpu; default: cuda if any"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Runs the command; bad input ends with ``error: ...`` and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        job = _job(args)
        ranks = init_ranks(args.device, key="--device")
    except (ConfigError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    try:
        return make_latents(job, Path(args.out).expanduser().resolve(), ranks, workers=args.workers)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    finally:
        close_ranks(ranks)


def cli() -> None:
    """The ``df-encode`` console script."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
