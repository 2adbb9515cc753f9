"""Reference (real-data) Fréchet statistics, computed once and cached as ``.npz``.

Re-extracting the real images at every evaluation is the main cost of FID in a training loop
(users ask for cached real statistics: lucidrains/denoising-diffusion-pytorch#224), and torchmetrics'
in-metric caching is lost with checkpoints. Here the statistics (μ, Σ, n; Heusel et al. 2017) of a
reference set are written once, to ``cache_dir/<slug>-<hash>.npz``, keyed by what determines them:
dataset, split, resolution, count and the extractor's name (plus any other entries of ``key``). The
file name is a readable slug plus a short hash of the sorted key; the key itself is stored inside the
file and compared on load, so a renamed or stale file is recomputed rather than trusted. Its SHA-256 is
kept beside it (``<file>.sha256``, :mod:`diffusionflow.metrics.cache`) and verified on every read: a
truncated, corrupted or unreadable file is recomputed with a warning and replaced atomically. The file is
read with ``np.load(allow_pickle=False)``.

Under torch.distributed the images are sharded (rank r extracts batches r, r + world, …; never
padded, so no image counts twice, unlike ``DistributedSampler``), the float64 sums are all-reduced
(EDM's ``fid.py`` does the same), the total is checked against ``key["count"]``, rank 0 writes the
file and, after a barrier, every rank reads it back: a fresh and a cached result are the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .cache import read_cached, write_cached
from .extractors import FeatureExtractor
from .frechet import FrechetStats

__all__ = ["cache_path", "reference_stats"]

logger = logging.getLogger(__name__)

SLUG_ORDER = ("dataset", "split", "resolution", "extractor", "count")


def _full_key(key: Mapping[str, str | int], extractor: FeatureExtractor) -> dict[str, str | int]:
    bad = {k: v for k, v in key.items() if not isinstance(v, str | int)}
    if bad:
        raise TypeError(f"reference key values must be str or int, got {bad}")
    if key.get("extractor", extractor.name) != extractor.name:
        raise ValueError(f"key names extractor {key['extractor']!r}, but the extractor is {extractor.name!r}")
    return dict(sorted({**key, "extractor": extractor.name}.items()))


def cache_path(key: Mapping[str, str | int], cache_dir: str | Path) -> Path:
    """``cache_dir/<slug>-<hash>.npz``: the values in ``SLUG_ORDER`` then the other keys' ``name=value``,
    and the first 10 hex digits of the SHA-256 of the key as sorted JSON."""
    rest = [f"{k}={v}" for k, v in sorted(key.items()) if k not in SLUG_ORDER]
    slug = "-".join([str(key[k]) for k in SLUG_ORDER if k in key] + rest)
    slug = re.sub(r"[^A-Za-z0-9_=-]+", "_", slug)[:96]
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{slug}-{digest}.npz"


def _save(stats: FrechetStats, path: Path, key: dict[str, str | int]) -> None:
    """``.npz`` with mu, sigma, n and the key as JSON, written with its checksum (atomically)."""
    mu, sigma = stats.mean_cov()
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, n=stats.count, key=json.dumps(key, sort_keys=True))
    write_cached(path, buffer.getvalue())


def _load(path: Path, key: dict[str, str | int], device: torch.device) -> FrechetStats | None:
    """The cached statistics if ``path`` holds them under exactly ``key`` and matches its checksum,
    else None."""
    data = read_cached(path, logger, "reference statistics")
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            stored, mu, sigma, n = json.loads(npz["key"].item()), npz["mu"], npz["sigma"], int(npz["n"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        logger.warning("unreadable reference statistics %s (%s): recomputing", path, err)
        return None
    if stored != key:
        logger.warning(
            "reference statistics %s were stored under key %s, not %s: recomputing", path, stored, key
        )
        return None
    # Back from (μ, Σ, n) to the sums: Σf = nμ, Σffᵀ = (n − 1)Σ + nμμᵀ.
    stats = FrechetStats(len(mu), device=device)
    mu_t, sigma_t = torch.from_numpy(mu).to(stats.sum), torch.from_numpy(sigma).to(stats.sum)
    stats.n.fill_(n)
    stats.sum.copy_(n * mu_t)
    stats.outer.copy_((n - 1) * sigma_t + n * torch.outer(mu_t, mu_t))
    return stats


def _every(batches: Iterable[Tensor], rank: int, world: int) -> Iterable[Tensor]:
    """Batches ``rank``, ``rank + world``, … of an iterable that every rank sees in full."""
    return (batch for i, batch in enumerate(batches) if i % world == rank)


def reference_stats(
    images: Iterable[Tensor] | Callable[[int, int], Iterable[Tensor]],
    extractor: FeatureExtractor,
    key: Mapping[str, str | int],
    cache_dir: str | Path,
) -> FrechetStats:
    """Fréchet statistics of ``extractor`` features of a reference set, from the cache when present.

    ``images`` yields uint8 (B, C, H, W) batches: either a callable ``(rank, world) -> iterable`` that
    yields only that rank's share (e.g. ``functools.partial(images.image_batches, source, 64)``), or
    an iterable of all batches, identical on every rank, of which rank r keeps batches r::world.
    It is not touched on a cache hit. ``key`` (str/int values; ``count``, when present, must equal the
    number of images seen) is completed with ``extractor = extractor.name``.
    """
    full_key = _full_key(key, extractor)
    path = cache_path(full_key, cache_dir)
    device = extractor.device
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    # Rank 0 decides hit or miss for everyone, so that all ranks take part in the same collectives.
    cached = _load(path, full_key, device) if rank == 0 else None
    hit = torch.tensor(int(cached is not None), device=device)
    if distributed:
        dist.broadcast(hit, src=0)
    if hit.item():
        logger.info("reference statistics: cache hit %s", path)
    else:
        logger.info("reference statistics: computing %s on %d rank(s)", path, world)
        batches = images(rank, world) if callable(images) else _every(images, rank, world)
        stats = FrechetStats(extractor.feature_dim, device=device)
        with torch.no_grad():
            for batch in batches:
                stats.update(extractor(batch.to(device)))
        stats.all_reduce()
        if "count" in full_key and stats.count != int(full_key["count"]):
            raise RuntimeError(
                f"reference set gave {stats.count} images, but its key says count={full_key['count']} "
                "(limit the source to that many, e.g. image_batches(..., limit=count))"
            )
        if rank == 0:
            _save(stats, path, full_key)
            logger.info("reference statistics: wrote %s", path)
    if distributed:
        dist.barrier()
    stats = cached if cached is not None else _load(path, full_key, device)
    if stats is None:
        raise RuntimeError(
            f"rank {rank} cannot read the reference statistics {path} (is the cache dir shared?)"
        )
    return stats
