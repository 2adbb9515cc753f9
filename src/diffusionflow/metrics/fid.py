"""Fréchet distances of generated images, as plain functions (EDM's ``fid.py``: statistics, then a distance).

* :func:`generate_features`: features of generated images (``metrics.generate``'s per-sample seeds),
  accumulated as float64 sums (:class:`~diffusionflow.metrics.frechet.FrechetStats`) that a caller may
  all-reduce over ranks.
* :func:`reference_moments`: (μ, Σ) of the reference set, cached by ``metrics.reference``.
* :class:`EvalRow` and :func:`append_rows`: one measured number with what reproduces it, in a CSV;
  :func:`metric_key` names it ``{metric}/{N}_{sampler}{NFE}_{weights}``, e.g. ``fid/50k_heun35_ema``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusionflow.core.samplers import Sampler

from .extractors import FeatureExtractor, to_uint8
from .frechet import FrechetStats
from .generate import GenerativeModel, generate_batches, shard
from .reference import reference_stats

__all__ = [
    "REFERENCE_SPLITS",
    "EvalRow",
    "Generated",
    "append_rows",
    "decode_latents",
    "describe_dataset",
    "format_count",
    "generate_features",
    "metric_key",
    "metric_name_of",
    "reference_moments",
]

REFERENCE_SPLITS = ("train", "val")


# ---- what is measured, and how it is named ---------------------------------------------------------
def format_count(n: int) -> str:
    """500 → ``500``, 10000 → ``10k``, 50000 → ``50k`` (thousands only when exact)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_key(metric: str, num_samples: int, sampler: str, nfe: int, weights: str) -> str:
    """``{metric}/{N}_{sampler}{NFE}_{weights}``, e.g. ``fid/10k_heun35_ema``."""
    return f"{metric}/{format_count(num_samples)}_{sampler}{nfe}_{weights}"


def metric_name_of(extractor: nn.Module) -> str:
    """The extractor's ``metric_name`` (``fd_digits``), else ``fid`` for Inception, else ``fd_<name>``:
    only Inception features give "FID"."""
    name = getattr(extractor, "metric_name", None)
    if name:
        return str(name)
    return "fid" if extractor.name.startswith("inception") else f"fd_{extractor.name}"


# ---- features of generated images ------------------------------------------------------------------
@dataclass
class Generated:
    """What :func:`generate_features` returns: this rank's (not yet all-reduced) statistics, the indices
    it generated, and the first ``keep`` images as uint8 (for a mosaic)."""

    stats: FrechetStats
    indices: list[int]
    images: Tensor


DECODE_BATCH = 32
"""Latents per decoder call (the SD VAE decodes 32 images of 256² in a few GB)."""


def decode_latents(
    decode: Callable[[Tensor], Tensor], latents: Tensor, device: torch.device | str | None = None
) -> Tensor:
    """Images of ``latents`` by ``decode`` (latents → images in [−1, 1]), ``DECODE_BATCH`` at a time, in
    float32 on ``device`` (None: the latents' device), without autograd."""
    device = latents.device if device is None else device
    with torch.no_grad():
        return torch.cat([decode(z.to(device).float()) for z in latents.split(DECODE_BATCH)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_features(
    model: GenerativeModel,
    sampler: Sampler,
    indices: Sequence[int],
    extractor: FeatureExtractor,
    *,
    shape: Sequence[int],
    batch_size: int,
    seed_offset: int = 0,
    keep: int = 0,
    progress: bool = False,
    desc: str = "",
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Generated:
    """Generates ``indices`` (:func:`~diffusionflow.metrics.generate.generate_batches`: seed
    ``seed_offset + i``, label i mod K), rounds them to uint8 as a saved PNG would be
    (:func:`~diffusionflow.metrics.extractors.to_uint8`) and accumulates the extractor's features in float64
    sums. ``progress`` shows a bar with the generation and feature-extraction throughput. A latent model's
    samples (``shape`` the latent shape) go through ``decode`` (e.g. ``nn.vae.LatentCodec.decode``: latents
    → images in [−1, 1], in float32) first: features and kept images are of the decoded images (decoding
    counts as generation time)."""
    stats = FrechetStats(extractor.feature_dim, device=model.device)
    done: list[int] = []
    kept: list[Tensor] = []
    seconds = {"gen": 0.0, "feat": 0.0}
    batches = generate_batches(
        model, indices, shape=shape, batch_size=batch_size, seed_offset=seed_offset, sampler=sampler
    )
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        tick = time.perf_counter()
        for idx, samples in batches:
            if decode is not None:
                samples = decode_latents(decode, samples)
            images = to_uint8(samples)
            _sync(images.device)
            generated = time.perf_counter()
            with torch.no_grad():
                stats.update(extractor(images))
            _sync(images.device)
            seconds["gen"] += generated - tick
            tick = time.perf_counter()
            seconds["feat"] += tick - generated
            done += idx
            if sum(len(k) for k in kept) < keep:
                kept.append(images[: keep - sum(len(k) for k in kept)].cpu())
            bar.update(len(idx))
            bar.set_postfix({k: f"{len(done) / max(v, 1e-9):.0f} img/s" for k, v in seconds.items()})
    empty = torch.zeros(0, *shape, dtype=torch.uint8)
    return Generated(stats, done, torch.cat(kept) if kept else empty)


# ---- the reference set -------------------------------------------------------------------------------
@contextmanager
def _no_flips(dataset: Any) -> Iterator[None]:
    """Reference images as stored: random flips (train-time augmentation) off meanwhile."""
    hflip = getattr(dataset, "hflip", False)
    dataset.hflip = False
    try:
        yield
    finally:
        dataset.hflip = hflip


def _dataset_batches(
    dataset: Any,
    batch_size: int,
    rank: int,
    world: int,
    decode: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[Tensor]:
    """uint8 batches of this rank's shard of ``dataset`` (items ``(x in [-1, 1], y)``; latents through
    ``decode``, on ``device``, when given)."""
    with _no_flips(dataset):
        idx = shard(len(dataset), rank, world)
        for start in range(idx.start, idx.stop, batch_size):
            items = range(start, min(start + batch_size, idx.stop))
            x = torch.stack([dataset[i][0] for i in items])
            yield to_uint8(x if decode is None else decode_latents(decode, x, device))


def describe_dataset(factory: Callable[[], Any], dataset: Any) -> str:
    """The dataset's class (or factory) with the options that change its images, not ``root``,
    ``download``, ``hflip``, ``split`` or ``resolution``: e.g. ``Digits(n_train=1500,split_seed=0,...)``."""
    func = getattr(factory, "func", factory)
    skip = ("root", "download", "hflip", "split", "resolution")
    options = {k: v for k, v in sorted(getattr(factory, "keywords", {}).items()) if k not in skip}
    name = getattr(func, "__name__", type(dataset).__name__)
    return f"{name}({','.join(f'{k}={v}' for k, v in options.items())})" if options else name


def reference_moments(
    reference: str,
    datamodule: Any,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    batch_size: int = 256,
    decode: Callable[[Tensor], Tensor] | None = None,
    decoder: str | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(μ, Σ, key as JSON) of the reference set. ``train`` or ``val``: all of the (set-up) DataModule's
    set, through the cached, rank-sharded :func:`~diffusionflow.metrics.reference.reference_stats` (call
    it on every rank), keyed by dataset, split, resolution, extractor and count. A latent set is decoded
    by ``decode`` (on the extractor's device) and keyed by ``decoder`` too (e.g. the VAE, its weights'
    SHA-256 and the normalisation): the reference is then the VAE's reconstructions of the set, so that
    the distance measures the generative model, not the autoencoder.

    Else ``reference`` is an ``.npz`` whose ``mu`` and ``sigma`` are read (``allow_pickle=False``; other
    arrays are not loaded): EDM's ``fid.py ref`` files, or ADM's reference batches (Dhariwal & Nichol
    2021, guided-diffusion ``evaluations/``; e.g. ``VIRTUAL_imagenet256_labeled.npz``, whose ``mu`` and
    ``sigma`` are the 2048-d Inception pool3 statistics of the real images beside ``arr_0``, the images,
    and ``mu_s``/``sigma_s``, the spatial features of sFID, not used here)."""
    if reference not in REFERENCE_SPLITS:
        with np.load(reference) as npz:
            mu, sigma = npz["mu"], npz["sigma"]
        if mu.shape != (extractor.feature_dim,):
            raise ValueError(
                f"reference={reference}: mu has shape {mu.shape}, but {extractor.name} gives "
                f"{extractor.feature_dim} features"
            )
        return mu, sigma, json.dumps({"file": str(reference)})
    train = reference == "train"
    factory = datamodule.train_factory if train else datamodule.val_factory
    dataset = datamodule.train_set if train else datamodule.val_set
    if dataset is None:
        raise ValueError("reference=val, but the DataModule has no val_dataset")
    key: dict[str, str | int] = {
        "dataset": describe_dataset(factory, dataset),
        "split": reference,
        "resolution": int(dataset[0][0].shape[-1]),
        "extractor": extractor.name,
        "count": len(dataset),
    }
    if decode is not None:
        key["decoded_by"] = str(decoder)
    stats = reference_stats(
        lambda rank, world: _dataset_batches(dataset, batch_size, rank, world, decode, extractor.device),
        extractor,
        key,
        cache_dir,
    )
    return *stats.mean_cov(), json.dumps(key, sort_keys=True)


# ---- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRow:
    """One measured number, with everything needed to reproduce it."""

    key: str
    metric: str
    value: float
    num_samples: int
    sampler: str
    steps: int
    nfe: int
    seeds: str
    weights: str
    reference: str
    sampler_config: str
    guidance: float | None = None
    """The classifier-free guidance scale (None: the run's own, or an unconditional model)."""
    train_images: int | None = None
    """Training images the weights had seen (optimizer steps × global batch), for snapshot curves."""


def append_rows(path: Path, rows: Sequence[EvalRow], **extra: Any) -> None:
    """Appends ``rows`` (with ``extra`` columns first) to a CSV, writing the header to a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*extra, *EvalRow.__dataclass_fields__])
        if new:
            writer.writeheader()
        writer.writerows({**extra, **asdict(row)} for row in rows)
