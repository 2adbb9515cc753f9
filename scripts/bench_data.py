"""Data-loader throughput (images/s) beside the GPU training rate each loader must feed.

    python scripts/bench_data.py [--quick] [--batches 40] [--rounds 3] [--workers 0 2] [--images 10000]

Each loader runs through the real :class:`~diffusionflow.lightning.datamodule.DiffusionDataModule` path
(its sampler, seeded generator, ``ResumableDataLoader``; batch 128 on one rank, pin_memory off on this
CPU machine) over random data written here in the real on-disk formats, with the preset's dataset
options:

* ``cifar10``: :class:`~diffusionflow.data.cifar10.CIFAR10` from a ``cifar-10-batches-py/`` folder of
  pickles (``conf/data/cifar10.yaml``: train split, random flips), uint8 held in memory, scaled per item;
* ``latents``: :class:`~diffusionflow.data.latents.LatentDataset`, a memory-mapped float32
  ``latents.npy`` of 4 × 32 × 32 latents (256² images through the SD VAE; ``conf/data/latents.yaml``);
* ``imagenet64``: :class:`~diffusionflow.data.imagenet.ImageNetNpz` from the ten Downsampled ImageNet
  ``train_data_batch_*.npz`` files (converted once to one memory-mapped ``.npy``; random flips).

A loader's rate is images over the wall time of ``--batches`` batches after two warm-up batches (worker
start-up excluded), the median over ``--rounds`` rounds in which the rows run interleaved. The rate
each must feed is an assumed figure for one H200 in bf16, no measurement (see ``NEEDS``).
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusionflow.data.cifar10 import CIFAR10
from diffusionflow.data.imagenet import ImageNetNpz, npz_files
from diffusionflow.data.latents import LatentDataset
from diffusionflow.lightning.datamodule import DiffusionDataModule

BATCH = 128
LATENT_SHAPE = (4, 32, 32)

NEEDS = {
    "cifar10": (
        3000,
        "EDM ddpmpp_cifar, batch 128, bf16: EDM trained it at ~145 img/s per V100 in fp32 (200 Mimg in "
        "~2 days on 8 GPUs, Karras et al. 2022); an H200 in bf16 assumed ~20x that",
    ),
    "latents": (
        5000,
        "DiT-B/2 on 4x32x32 latents, bf16: 23 GFLOPs/img forward (Peebles & Xie 2023, Table 1), x3 for "
        "forward + backward = 69 GFLOPs/img; at ~35 % of the H200's 989 dense bf16 TFLOPS",
    ),
    "imagenet64": (
        250,
        "EDM's ImageNet-64 network (ADM, 296 M params): ~2.5 Gimg in ~2 weeks on 32 A100s, i.e. "
        "~70-90 img/s per A100 (Karras et al. 2022); an H200 assumed ~3x an A100",
    ),
}
"""Loader → (images/s one H200 trains at, where the figure comes from). Assumptions, not measurements."""


# ---- random data in the real formats -------------------------------------------------------------
def write_cifar10(root: Path, n: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/``: ``n`` random train images over the five batch pickles, a test
    batch and ``batches.meta``, as the real archive lays them out."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, part in enumerate(np.array_split(np.arange(n), 5), start=1):
        data = rng.integers(0, 256, (len(part), 3072), dtype=np.uint8)
        _pickle(folder / f"data_batch_{i}", {b"data": data, b"labels": (part % 10).tolist()})
    _pickle(folder / "test_batch", {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))})
    names = b"airplane automobile bird cat deer dog frog horse ship truck".split()
    _pickle(folder / "batches.meta", {b"label_names": names})
    return root


def _pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_latents(root: Path, n: int, seed: int = 0) -> Path:
    """A latent folder as ``diffusionflow.encode`` writes it: ``latents.npy`` (raw m(x), float32),
    ``labels.npy`` and ``meta.json`` (edm2 normalisation)."""
    root.mkdir(parents=True, exist_ok=True)
    latents = np.lib.format.open_memmap(
        root / "latents.npy", mode="w+", dtype=np.float32, shape=(n, *LATENT_SHAPE)
    )
    latents[:] = np.random.default_rng(seed).normal(0.5, 4.0, size=latents.shape)
    latents.flush()
    np.save(root / "labels.npy", np.arange(n) % 1000)
    channels = LATENT_SHAPE[0]
    meta = {
        "vae": "sd-vae-ft-ema",
        "vae_weights_sha256": "0" * 64,
        "normalisation": "edm2",
        "mean": [0.5] * channels,
        "std": [8.0] * channels,
        "data_mean": [0.5] * channels,
        "data_std": [4.0] * channels,
        "scaling_factor": 0.18215,
        "image_resolution": 256,
        "latent_shape": list(LATENT_SHAPE),
        "flip_copies": False,
        "source": "random (scripts/bench_data.py)",
        "count": n,
        "num_classes": 1000,
        "done": True,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def write_imagenet_npz(root: Path, n: int, resolution: int = 64, seed: int = 0) -> Path:
    """The ten Downsampled ImageNet train files with ``n`` random images in all (uint8 rows of
    3·r·r, labels 1..1000), stored uncompressed as the released archives are."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, part in zip(npz_files("train"), np.array_split(np.arange(n), 10), strict=True):
        data = rng.integers(0, 256, (len(part), 3 * resolution * resolution), dtype=np.uint8)
        np.savez(root / name, data=data, labels=part % 1000 + 1)
    return root


# ---- measurement ---------------------------------------------------------------------------------
def datamodules(root: Path, images: int) -> dict[str, Callable[[int], DiffusionDataModule]]:
    """Loader name → ``num_workers`` → a set-up DataModule with the preset's dataset options."""
    cifar = write_cifar10(root / "cifar", images)
    latents = write_latents(root / "latents", images)
    imagenet = write_imagenet_npz(root / "imagenet64", images)
    factories: dict[str, tuple[Callable[[], Any], Sequence[int], int]] = {
        "cifar10": (functools.partial(CIFAR10, root=cifar, split="train", hflip=True), (3, 32, 32), 10),
        "latents": (
            functools.partial(LatentDataset, root=latents, expect_vae="sd-vae-ft-ema"),
            LATENT_SHAPE,
            1000,
        ),
        "imagenet64": (
            functools.partial(ImageNetNpz, root=imagenet, resolution=64, hflip=True),
            (3, 64, 64),
            1000,
        ),
    }

    def build(
        factory: Callable[[], Any], shape: Sequence[int], classes: int, workers: int
    ) -> DiffusionDataModule:
        dm = DiffusionDataModule(factory, BATCH, shape, classes, num_workers=workers, persistent_workers=True)
        dm.setup("fit")
        return dm

    return {name: functools.partial(build, *spec) for name, spec in factories.items()}


def images_per_second(dm: DiffusionDataModule, batches: int, warmup: int = 2) -> float:
    """Images per second over ``batches`` batches of the training loader, after ``warmup`` batches
    (worker start-up); the loader is re-iterated (next epoch) if it runs out."""
    loader = dm.train_dataloader()
    it = iter(loader)

    def next_batch() -> Any:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    for _ in range(warmup):
        next_batch()
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += len(next_batch()[0])
    return count / (time.perf_counter() - start)


def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Every (loader, workers) row, ``args.rounds`` interleaved rounds, the median rate per row."""
    builders = datamodules(root, args.images)
    rows = [(name, w) for name in builders for w in args.workers]
    rates: dict[tuple[str, int], list[float]] = {row: [] for row in rows}
    for r in range(args.rounds):
        for name, workers in rows if r % 2 == 0 else rows[::-1]:
            rates[(name, workers)].append(images_per_second(builders[name](workers), args.batches))
    out = []
    for (name, workers), values in rates.items():
        need = NEEDS[name][0]
        rate = float(np.median(values))
        out.append(
            {"loader": name, "workers": workers, "images_per_s": rate, "need": need, "ratio": rate / need}
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| loader | num_workers | images/s | H200 step rate to feed (assumed) | loader/GPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['loader']} | {row['workers']} | {row['images_per_s']:.0f} | {row['need']} "
            f"| {row['ratio']:.2f}{'' if row['ratio'] >= 1 else ' (too slow)'} |"
        )
    lines.append("")
    lines += [f"* {name}: {need} img/s: {why}" for name, (need, why) in NEEDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 batches, 1 round, 1280 images per set")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of 128 per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values")
    parser.add_argument("--images", type=int, default=10_000, help="images (latents) per dataset")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.rounds, args.images = 4, 1, 1280
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(tmp))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
