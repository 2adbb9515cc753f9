"""Both metric caches (reference statistics ``.npz``, digits classifier ``.pt``) carry a SHA-256 beside
them: a truncated, garbage, bit-flipped or checksum-less file is rebuilt with a warning naming it, and
the rebuilt result equals a fresh build."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from diffusionflow.metrics import digits_classifier as dc
from diffusionflow.metrics.cache import checksum_path, read_cached, write_cached
from diffusionflow.metrics.reference import cache_path, reference_stats
from helpers import MeanStd


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a cache file" * 8)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_checksum(path: Path) -> None:
    checksum_path(path).unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "does not match its SHA-256"),
    "garbage": (_garbage, "does not match its SHA-256"),
    "bit_flipped": (_flip_a_bit, "does not match its SHA-256"),
    "no_checksum": (_drop_checksum, "no readable checksum"),
}


def test_write_and_read_round_trip(tmp_path):
    log = logging.getLogger("test")
    path = tmp_path / "sub" / "x.bin"
    assert read_cached(path, log) is None
    write_cached(path, b"abc")
    assert read_cached(path, log) == b"abc"
    assert checksum_path(path).read_text().split() == [
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "x.bin",
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin", "x.bin.sha256"]  # no temporaries


@pytest.mark.parametrize("damage", DAMAGE)
def test_reference_statistics_are_rebuilt(tmp_path, caplog, image_sets, damage):
    key = {"dataset": "smooth", "split": "train", "resolution": 32, "count": 64}
    images = list(image_sets["a"].split(16))
    fresh = reference_stats(images, MeanStd(), key, tmp_path).mean_cov()
    path = cache_path({**key, "extractor": MeanStd.name}, tmp_path)
    assert checksum_path(path).is_file()
    harm, message = DAMAGE[damage]
    harm(path)
    with caplog.at_level(logging.INFO, logger="diffusionflow.metrics.reference"):
        rebuilt = reference_stats(images, MeanStd(), key, tmp_path).mean_cov()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and message in warnings[0] and str(path) in warnings[0], warnings
    assert "computing" in caplog.text
    for a, b in zip(fresh, rebuilt, strict=True):
        np.testing.assert_array_equal(a, b)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffusionflow.metrics.reference"):
        reference_stats([], MeanStd(), key, tmp_path)  # replaced: a hit, the images are not needed
    assert "cache hit" in caplog.text and "WARNING" not in caplog.text


@pytest.fixture
def fake_training(monkeypatch) -> list[int]:
    """Replaces the 5 s training by a seeded random init (what is tested is the cache); counts calls."""
    calls: list[int] = []

    def train(seed: int, feature_dim: int) -> tuple[dict[str, Tensor], float]:
        calls.append(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return dc._CNN(feature_dim).state_dict(), 0.5 + seed / 100

    monkeypatch.setattr(dc, "_fit", train)
    return calls


@pytest.mark.parametrize("damage", DAMAGE)
def test_digits_classifier_cache_is_rebuilt(tmp_path, caplog, fake_training, damage):
    fresh = dc.DigitsClassifier(cache_dir=tmp_path, seed=3)
    assert fake_training == [3] and checksum_path(fresh.path).is_file()
    assert dc.DigitsClassifier(cache_dir=tmp_path, seed=3).test_accuracy == fresh.test_accuracy
    assert fake_training == [3], "a good cache is a hit"
    harm, message = DAMAGE[damage]
    harm(fresh.path)
    with caplog.at_level(logging.INFO, logger=dc.__name__):
        rebuilt = dc.DigitsClassifier(cache_dir=tmp_path, seed=3)
    assert fake_training == [3, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and message in warnings[0] and str(fresh.path) in warnings[0], warnings
    assert rebuilt.test_accuracy == fresh.test_accuracy
    for (name, a), b in zip(fresh.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    dc.DigitsClassifier(cache_dir=tmp_path, seed=3)
    assert fake_training == [3, 3], "the rebuilt file is a hit"


def test_digits_classifier_cache_of_another_classifier_is_rebuilt(tmp_path, caplog, fake_training):
    """A file whose checksum matches but that holds something else (here another seed's classifier)."""
    other = dc.DigitsClassifier(cache_dir=tmp_path, seed=1)
    mine = tmp_path / other.path.name.replace("seed1", "seed2")
    write_cached(mine, other.path.read_bytes())
    with caplog.at_level(logging.WARNING, logger=dc.__name__):
        rebuilt = dc.DigitsClassifier(cache_dir=tmp_path, seed=2)
    assert fake_training == [1, 2] and "unusable" in caplog.text and rebuilt.test_accuracy == 0.52
