"""CIFAR-10 batches are unpickled with an allowlist: numpy arrays and plain containers load, in every
pickle protocol and under numpy 1.x's module names; a batch that names any other global is refused,
naming the file, and its code never runs."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from diffusionflow.data.cifar10 import CIFAR10, FILES, FOLDER, META, _unpickle


class Hostile:
    """Unpickling it would create the folder ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return (os.mkdir, (str(self.marker),))


def _cifar(root: Path, test_batch: bytes | None = None) -> Path:
    """A minimal CIFAR-10 folder (one image per batch); ``test_batch`` replaces that file's bytes."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([*FILES["train"], *FILES["test"]]):
        batch = {b"data": rng.integers(0, 256, (1, 3072), dtype=np.uint8), b"labels": [i]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / META).write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    if test_batch is not None:
        (folder / "test_batch").write_bytes(test_batch)
    return root


def test_a_hostile_batch_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    hostile = pickle.dumps({b"data": Hostile(marker), b"labels": [0]})
    root = _cifar(tmp_path / "root", hostile)
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 python batch.*posix\.mkdir") as error:
        CIFAR10(root, "test")
    assert "which a CIFAR-10 batch never holds" in str(error.value)
    assert not marker.exists(), "the hostile pickle ran code"
    assert len(CIFAR10(root, "train")) == 5  # the other batches still load


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (b"\x80\x04garbage", "not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2]), "a list"),
    ],
)
def test_broken_batches_name_the_file(tmp_path, data, match):
    root = _cifar(tmp_path, data)
    with pytest.raises(ValueError, match=match) as error:
        CIFAR10(root, "test")
    assert str(root / FOLDER / "test_batch") in str(error.value)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_batches_load_in_every_protocol_and_under_numpy_1_names(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"data": data, b"labels": [3, 4], b"filenames": [b"a.png", b"b.png"], b"batch_label": b"x"}
    raw = pickle.dumps(batch, protocol=protocol)
    if protocol <= 2:  # text GLOBAL opcodes: write numpy 1.x's module path, as the original files do
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in raw
    (tmp_path / "batch").write_bytes(raw)
    loaded = _unpickle(tmp_path / "batch")
    assert np.array_equal(loaded[b"data"], data) and loaded[b"data"].dtype == np.uint8
    assert loaded[b"labels"] == [3, 4] and loaded[b"filenames"] == [b"a.png", b"b.png"]
