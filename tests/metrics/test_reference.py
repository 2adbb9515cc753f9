"""Reference statistics cache (miss, hit, changed key, stored-key check, exact count, 2-rank gloo run)
and the image readers it feeds on (PNG folders, ``.npz``, sharding).

A cheap stand-in extractor (per-channel mean and std) replaces Inception: what is tested here is
the caching and the sharding, not the features.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from diffusionflow.metrics import FrechetStats, count_images, image_batches, save_png_folder
from diffusionflow.metrics.cache import checksum_path
from diffusionflow.metrics.reference import cache_path, reference_stats
from helpers import MeanStd

KEY = {"dataset": "smooth", "split": "train", "resolution": 32, "count": 64}
LOGGER = "diffusionflow.metrics.reference"


def direct_stats(images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    stats = FrechetStats(MeanStd.feature_dim)
    stats.update(MeanStd()(images))
    return stats.mean_cov()


def assert_same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], tol: float = 0.0) -> None:
    """Equal (μ, Σ) up to ``tol`` times each array's largest entry."""
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * np.abs(y).max())


class Untouchable:
    """An image iterable that fails the test if it is iterated."""

    def __iter__(self) -> Iterator[Tensor]:
        pytest.fail("the images were read although the statistics are cached")


def test_miss_hit_and_changed_key(tmp_path: Path, caplog: pytest.LogCaptureFixture, image_sets: dict) -> None:
    images = image_sets["a"]
    calls = []

    def shard(rank: int, world: int) -> list[Tensor]:
        calls.append((rank, world))
        return list(images.split(16))[rank::world]

    path = cache_path({**KEY, "extractor": MeanStd.name}, tmp_path)
    assert path.name.startswith("smooth-train-32-mean-std-64-") and len(path.stem.rsplit("-", 1)[1]) == 10
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = reference_stats(shard, MeanStd(), KEY, tmp_path)
    assert calls == [(0, 1)] and first.count == 64 and path.is_file()
    assert "computing" in caplog.text and "cache hit" not in caplog.text
    assert_same(first.mean_cov(), direct_stats(images), tol=1e-12)
    with np.load(path) as npz:
        assert "mean-std" in npz["key"].item() and int(npz["n"]) == 64

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        second = reference_stats(shard, MeanStd(), KEY, tmp_path)
        third = reference_stats(Untouchable(), MeanStd(), KEY, tmp_path)
    assert calls == [(0, 1)], "a cache hit must not read the images"
    assert f"cache hit {path}" in caplog.text and "computing" not in caplog.text
    assert_same(second.mean_cov(), first.mean_cov())
    assert_same(third.mean_cov(), first.mean_cov())

    for changed, subset in [({"count": 32}, images[:32]), ({"split": "test"}, images)]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            stats = reference_stats(list(subset.split(16)), MeanStd(), {**KEY, **changed}, tmp_path)
        assert "computing" in caplog.text, changed
        assert stats.count == len(subset)
        assert_same(stats.mean_cov(), direct_stats(subset), tol=1e-12)
    assert len(list(tmp_path.glob("*.npz"))) == 3 and len(list(tmp_path.glob("*.npz.sha256"))) == 3


def test_stored_key_is_verified(tmp_path: Path, caplog: pytest.LogCaptureFixture, image_sets: dict) -> None:
    """A file under the right name but holding another key's statistics is recomputed, not trusted."""
    images = image_sets["a"]
    reference_stats([images], MeanStd(), KEY, tmp_path)
    other = {**KEY, "split": "test"}
    other_path = cache_path({**other, "extractor": MeanStd.name}, tmp_path)
    shutil.copy(cache_path({**KEY, "extractor": MeanStd.name}, tmp_path), other_path)
    shutil.copy(
        checksum_path(cache_path({**KEY, "extractor": MeanStd.name}, tmp_path)), checksum_path(other_path)
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        stats = reference_stats([images.flip(0)], MeanStd(), other, tmp_path)
    assert "stored under key" in caplog.text and "computing" in caplog.text
    assert stats.count == 64
    with np.load(other_path) as npz:
        assert '"split": "test"' in npz["key"].item()


def test_count_and_key_checks(tmp_path: Path, image_sets: dict) -> None:
    images = image_sets["a"]
    with pytest.raises(RuntimeError, match="count=50"):
        reference_stats([images], MeanStd(), {**KEY, "count": 50}, tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written for a wrong count"
    with pytest.raises(ValueError, match="extractor"):
        reference_stats([images], MeanStd(), {**KEY, "extractor": "inception-v3-compat"}, tmp_path)
    with pytest.raises(TypeError, match="str or int"):
        reference_stats([images], MeanStd(), {**KEY, "resolution": 32.0}, tmp_path)


def _ddp_worker(rank: int, world: int, init_file: str, source: str, cache_dir: str, out: str) -> None:
    """One gloo rank: a sharded callable (miss), a full iterable (miss), then a cache hit."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        key = {"dataset": "npz", "split": "train", "resolution": 32, "count": 37}
        sharded = reference_stats(functools.partial(image_batches, source, 8), MeanStd(), key, cache_dir)
        full = list(image_batches(source, 8))
        iterated = reference_stats(full, MeanStd(), {**key, "split": "iterable"}, cache_dir)
        hit = reference_stats(Untouchable(), MeanStd(), key, cache_dir)
        result = {
            name: (*s.mean_cov(), s.count)
            for name, s in (("sharded", sharded), ("iterated", iterated), ("hit", hit))
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_shard_exactly(tmp_path: Path, image_sets: dict) -> None:
    """Two gloo processes: 37 images in batches of 8 (rank 0 gets 21, rank 1 16), all-reduced to
    exactly the single-process statistics, written once, read back the same on both ranks."""
    images = image_sets["b"][:37]
    source = tmp_path / "ref.npz"
    np.savez(source, samples=images.permute(0, 2, 3, 1).numpy())
    cache_dir = tmp_path / "cache"
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(source), str(cache_dir), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    expected = direct_stats(images)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for result in results:
        for mu, sigma, n in result.values():
            assert n == 37
            assert_same((mu, sigma), expected, tol=1e-12)
    for name in results[0]:
        assert_same(results[0][name][:2], results[1][name][:2])
    assert sorted(p.name.split("-")[1] for p in cache_dir.glob("*.npz")) == ["iterable", "train"]


def test_png_folder_batches_and_shards(tmp_path: Path, image_sets: dict) -> None:
    images = image_sets["a"][:37]
    save_png_folder(images, tmp_path / "pngs")
    (tmp_path / "pngs" / "notes.txt").write_text("not an image")
    assert count_images(tmp_path / "pngs") == 37
    batches = list(image_batches(tmp_path / "pngs", batch_size=8))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5] and all(b.dtype == torch.uint8 for b in batches)
    assert torch.equal(torch.cat(batches), images)
    shards = [list(image_batches(tmp_path / "pngs", 8, rank, 3)) for rank in range(3)]
    for rank, shard in enumerate(shards):
        assert all(torch.equal(b, batches[i]) for b, i in zip(shard, range(rank, 5, 3), strict=True))
    assert sum(len(b) for shard in shards for b in shard) == 37
    assert torch.equal(torch.cat(list(image_batches(tmp_path / "pngs", 8, limit=20))), images[:20])
    with pytest.raises(ValueError, match="fewer than"):
        next(image_batches(tmp_path / "pngs", limit=38))
    grey = images[:3, :1]
    save_png_folder(grey, tmp_path / "grey")
    assert torch.equal(next(image_batches(tmp_path / "grey")), grey.expand(-1, 3, -1, -1))


def test_npz_layouts(tmp_path: Path, image_sets: dict) -> None:
    images = image_sets["b"][:10]
    nhwc = images.permute(0, 2, 3, 1).numpy()
    for name, arrays in [
        ("samples", {"samples": nhwc, "labels": np.arange(10)}),
        ("positional", {"arr_0": nhwc}),
        ("images", {"images": nhwc, "other": nhwc[:2]}),
        ("single", {"x": nhwc}),
    ]:
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert count_images(tmp_path / f"{name}.npz") == 10
        assert torch.equal(torch.cat(list(image_batches(tmp_path / f"{name}.npz", 4))), images), name
    np.savez(tmp_path / "grey.npz", samples=nhwc[..., :1])
    assert torch.equal(next(image_batches(tmp_path / "grey.npz")), images[:, :1].expand(-1, 3, -1, -1))


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"a": np.zeros((2, 4, 4, 3), np.uint8), "b": np.zeros((2, 4, 4, 3), np.uint8)}, "single array"),
        ({"samples": np.zeros((2, 3, 4, 4), np.uint8)}, "NCHW"),
        ({"samples": np.zeros((2, 4, 4, 3), np.float32)}, "uint8"),
        ({"samples": np.zeros((4, 4, 3), np.uint8)}, "uint8 array"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        next(image_batches(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match=match):
        count_images(tmp_path / "bad.npz")


def test_other_sources_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="folder of .png files or a .npz"):
        count_images(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="folder of .png files or a .npz"):
        next(image_batches(tmp_path / "missing.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png files"):
        next(image_batches(tmp_path / "empty"))
    with pytest.raises(ValueError, match="uint8"):
        save_png_folder(torch.zeros(1, 3, 4, 4), tmp_path / "out")
