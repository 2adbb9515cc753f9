"""scripts/bench_train.py on its --quick sizes: both contenders run, train identically, and are reported."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"
RECORD = 3  # steps whose losses are compared (fewer than the quick runs time)


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script as a module, run on one thread (a shared machine's load stalls multi-threaded ops on
    many tiny tensors); the thread count is restored afterwards."""
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        del sys.modules[spec.name]


@pytest.fixture(scope="module", params=["unet_tiny", "mlp"])
def runs(bench: ModuleType, request: pytest.FixtureRequest) -> dict:
    """Every contender once on the quick setup, recording its first losses; and a bare run whose
    noise has another seed."""
    setup = bench.QUICK_SETUPS[request.param]
    comps, template, data = bench.components(), bench.build_backbone(setup), bench.synthetic_data(setup)
    out = {c: bench.run_contender(c, template, comps, setup, data, record=RECORD) for c in bench.CONTENDERS}
    out["other seed"] = bench.run_contender(bench.BARE, template, comps, setup, data, record=RECORD, seed=1)
    out["setup"] = setup
    return out


def test_every_contender_reports_a_positive_finite_time_per_step(bench: ModuleType, runs: dict) -> None:
    for contender in bench.CONTENDERS:
        run = runs[contender]
        assert len(run.times) == runs["setup"].steps + 1, contender
        assert math.isfinite(run.ms_per_step) and run.ms_per_step > 0, contender


def test_bare_loop_and_lightning_follow_the_same_loss_trajectory(bench: ModuleType, runs: dict) -> None:
    """Same weights, batches, λ and ε, loss and optimizer: the comparison is apples to apples (the EMA
    of the train.py row does not touch the trained weights)."""
    bare = torch.tensor(runs[bench.BARE].losses)
    assert len(bare) == RECORD and bool(torch.isfinite(bare).all())
    assert len(set(bare.tolist())) == RECORD  # the weights move: later losses test the optimizer too
    for contender in (bench.LIGHTNING, bench.TRAIN_PY):
        torch.testing.assert_close(torch.tensor(runs[contender].losses), bare, rtol=1e-5, atol=0)
    other = torch.tensor(runs["other seed"].losses)
    assert not torch.allclose(other, bare, rtol=1e-3, atol=0)  # so the check above has teeth


def test_markdown_report_has_a_row_per_contender(bench: ModuleType, tmp_path: Path) -> None:
    printed = bench.main(
        ["--quick", "--backbone", "mlp", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)]
    )
    text = (tmp_path / "bench_train.md").read_text()
    assert text == printed
    assert f"torch {torch.__version__}" in text and "threads: 1;" in text
    section = text.split("## mlp:")[1]
    for contender in bench.CONTENDERS:
        rows = [line for line in section.splitlines() if line.startswith(f"| {contender} |")]
        assert len(rows) == 1, contender
        cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
        assert all(float(cells[i]) > 0 for i in (1, 2, 3, 5)), cells
    assert "| 1.000 | +0.0% |" in section  # bare against itself
