"""scripts/bench_data.py in a quick mode: every loader row is measured through the DataModule path."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_data.py"
IMAGES = 640


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_quick_run_gives_a_positive_finite_rate_per_row(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    rows = bench.main(["--quick", "--batches", "2", "--images", str(IMAGES), "--json", str(out)])
    assert [(r["loader"], r["workers"]) for r in rows] == [
        (name, w) for name in ("cifar10", "latents", "imagenet64") for w in (0, 2)
    ]
    for row in rows:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
        assert row["ratio"] == pytest.approx(row["images_per_s"] / bench.NEEDS[row["loader"]][0])
    assert out.is_file()


def test_written_sets_load_in_full_with_the_preset_shapes(bench: ModuleType, tmp_path: Path) -> None:
    """The random data are in the real formats: each dataset holds every image written, batches
    have the preset's shapes and the pixel sets their [-1, 1] range."""
    for name, build in bench.datamodules(tmp_path, IMAGES).items():
        dm = build(0)
        assert len(dm.train_set) == IMAGES, name
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (bench.BATCH, *dm.shape) and y.shape == (bench.BATCH,), name
        if name != "latents":
            assert x.min() >= -1 and x.max() <= 1 and x.min() < 0 < x.max(), name
