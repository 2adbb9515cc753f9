"""Downsampled ImageNet memory-mapped: compressed or stored npz files converted once to one ``.npy``, the
copy reused while its sources and checksum hold, rebuilt when they do not."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from diffusionflow.data import imagenet
from diffusionflow.data.imagenet import ImageNetNpz, memory_mapped_npz, npz_files


def _write(folder: Path, compressed: bool, seed: int = 0) -> np.ndarray:
    """The ten train files (3 rows each at 8 px), each ``data`` member zip-deflated or stored."""
    rng = np.random.default_rng(seed)
    save = np.savez_compressed if compressed else np.savez
    rows = []
    for i, name in enumerate(npz_files("train")):
        data = rng.integers(0, 256, (3, 3 * 8 * 8), dtype=np.uint8)
        save(folder / name, data=data, labels=np.array([i + 1, i + 2, 1000]))
        rows.append(data)
    return np.concatenate(rows)


@pytest.mark.parametrize("compressed", [True, False], ids=["deflated", "stored"])
def test_the_map_holds_the_npz_rows(
    tmp_path: Path, compressed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read back in chunks smaller than a file (2 rows): the rows of all files in order, memory-mapped."""
    data = _write(tmp_path, compressed)
    monkeypatch.setattr(imagenet, "CHUNK_BYTES", 2 * 3 * 8 * 8)
    mapped = memory_mapped_npz(tmp_path, npz_files("train"), 8)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, data)
    train = ImageNetNpz(tmp_path, resolution=8, split="train")
    assert len(train) == 30 and train.y[-3:].tolist() == [9, 10, 999]
    assert np.array_equal(train.x.numpy().reshape(30, -1), data)


def test_the_copy_is_reused_and_rebuilt_when_stale_or_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path, compressed=True)
    names = npz_files("train")
    conversions = []
    convert = imagenet._convert
    monkeypatch.setattr(imagenet, "_convert", lambda *a: (conversions.append(a[0]), convert(*a)))
    memory_mapped_npz(tmp_path, names, 8)
    memory_mapped_npz(tmp_path, names, 8)
    assert len(conversions) == 1, "a valid copy is reused"
    copy = tmp_path / "mmap" / "train_8px.npy"
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        memory_mapped_npz(tmp_path, names, 8)
    assert len(conversions) == 2 and "does not match the SHA-256 in train_8px.json" in caplog.text
    fresh = _write(tmp_path, compressed=False, seed=1)  # new sources: new sizes and times
    assert np.array_equal(memory_mapped_npz(tmp_path, names, 8), fresh) and len(conversions) == 3
