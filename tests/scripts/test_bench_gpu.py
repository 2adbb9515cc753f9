"""scripts/bench_gpu.py: the --cpu-smoke run end to end, the clock's phases and sync counting, the flags."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from types import ModuleType

import pytest
import torch

from helpers import SCRIPTS, load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_gpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``--cpu-smoke`` run in a subprocess (the script as a user runs it): its output and files."""
    out = tmp_path_factory.mktemp("bench_gpu")
    env = {**os.environ, "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_gpu.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "stdout": proc.stdout,
        "md": (out / "bench_gpu.md").read_text(),
        "json": json.loads((out / "bench_gpu.json").read_text()),
    }


def table_rows(md: str) -> dict[str, list[str]]:
    """The Markdown table's rows: first cell → the other cells."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith(("| measurement", "|---")):
            label, *cells = (c.strip() for c in line.strip("|").split("|"))
            assert label not in rows, label
            rows[label] = cells
    return rows


def positive_finite(cell: str) -> bool:
    return math.isfinite(float(cell)) and float(cell) > 0


@pytest.mark.slow  # the smoke run in a subprocess: about a minute on a loaded 2-core machine
def test_smoke_run_reports_every_row_with_positive_finite_figures(bench: ModuleType, smoke: dict) -> None:
    assert smoke["md"] in smoke["stdout"]
    assert f"torch {torch.__version__}" in smoke["md"] and "CPU smoke run" in smoke["md"]
    rows = table_rows(smoke["md"])
    training = [
        f"{kind}: {contender}"
        for kind in ("training images/s", "peak memory (GiB)", "first 1 steps (s, compilation included)")
        for contender in bench.CONTENDERS
    ]
    ratios = [f"{c} / bare (images/s)" for c in bench.CONTENDERS[1:]]
    anchor = [next(label for label in rows if "EDM's 145 images/s per V100" in label)]
    for label in training + ratios + anchor:
        assert all(positive_finite(cell) for cell in rows[label]), (label, rows[label])
    for contender in bench.CONTENDERS:  # no CUDA, no sync check: said, not a made-up 0
        assert rows[f"host syncs on non-logging steps: {contender}"] == ["not checked (no CUDA)"] * 2
    sampling = next(label for label in rows if label.startswith("heun sampling images/s"))
    features = next(label for label in rows if label.startswith("Inception feature images/s"))
    assert "NFE 35" in sampling
    for label in (sampling, features):
        assert positive_finite(rows[label][0]) and rows[label][1] == "–"
    assert len(rows) == len(training) + len(ratios) + len(anchor) + len(bench.CONTENDERS) + 2


@pytest.mark.slow
def test_smoke_json_holds_the_figures_of_the_table(bench: ModuleType, smoke: dict) -> None:
    results = smoke["json"]["results"]
    rows = table_rows(smoke["md"])
    for i, mode in enumerate(bench.MODES):
        bare = results[mode][bench.BARE]["images_per_s"]
        for contender in bench.CONTENDERS[1:]:
            ratio = results[mode][contender]["images_per_s"] / bare
            assert float(rows[f"{contender} / bare (images/s)"][i]) == pytest.approx(ratio, abs=6e-4)
    assert results["sampling"]["detail"]["nfe"] == 35  # Heun, 18 steps on the EDM grid
    assert results["features"]["detail"]["feature_dim"] == 2048
    assert smoke["json"]["config"]["compile_backend"] == "eager"


@pytest.mark.slow
def test_bare_loop_and_lightning_train_the_same_first_step(bench: ModuleType, smoke: dict) -> None:
    """Same weights, batch, λ and ε, bf16 autocast: the contenders compute the same loss, eager and
    compiled (dynamo's eager backend runs the same ops)."""
    results = smoke["json"]["results"]
    losses = [results[mode][c]["first_loss"] for mode in bench.MODES for c in bench.CONTENDERS]
    assert all(math.isfinite(v) for v in losses)
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-6)


def ticks(
    clock, steps: range, logging: set[int] = frozenset(), syncs: dict[int, int] | None = None
) -> list[bool]:
    """``clock.tick`` at each step's start; with ``syncs``, the step then emits ``syncs[step]`` sync
    warnings (torch's text) and an unrelated warning."""
    out = []
    for step in steps:
        out.append(clock.tick(step, step in logging))
        if syncs is not None:
            for _ in range(syncs.get(step, 0)):
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    return out


def test_clock_times_the_steps_after_the_warmup_then_watches_the_next(bench: ModuleType) -> None:
    cfg = dataclasses.replace(bench.SMOKE, warmup=2, steps=3, sync_steps=2, budget_s=1e9)
    clock = bench.Clock(cfg, torch.device("cpu"))
    assert ticks(clock, range(9)) == [True] * 7 + [False] * 2  # 2 warm-up + 3 timed + 2 watched
    assert clock.timed_steps == 3 and clock.timed_s > 0 and clock.warmup_s > 0
    assert clock.images_per_s == pytest.approx(3 * cfg.batch / clock.timed_s)
    budget = bench.Clock(dataclasses.replace(cfg, budget_s=1e-12), torch.device("cpu"))
    assert ticks(budget, range(9)) == [True] * 5 + [False] * 4  # the budget closes the window early
    assert budget.timed_steps == 1


def test_clock_counts_sync_warnings_per_watched_step(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counting on a stand-in for CUDA (no GPU here): the device synchronisation and the debug mode
    are recorded, not done; each watched step's warnings are filed under it, logging steps apart."""
    modes: list[str] = []
    monkeypatch.setattr(bench, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    cfg = dataclasses.replace(bench.SMOKE, warmup=1, steps=2, sync_steps=3, budget_s=1e9)
    clock = bench.Clock(cfg, torch.device("cuda"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        steps = ticks(clock, range(7), logging={4}, syncs={0: 5, 2: 1, 3: 2, 4: 7, 5: 1, 6: 3})
        assert warnings.filters == filters  # the clock's own filters are gone
    assert steps == [True] * 6 + [False]  # 1 warm-up + 2 timed + 3 watched
    assert clock.syncs == {False: [2, 1], True: [7]}  # steps 3 and 5; step 4 logs; the rest unwatched
    assert modes == ["warn", "default"]


def test_without_cuda_and_without_cpu_smoke_the_script_says_a_gpu_is_needed(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", "unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "GPU" in err and "--cpu-smoke" in err


@pytest.mark.parametrize(("flag", "value"), [("--warmup", "0"), ("--steps", "0"), ("--budget", "-1")])
def test_bad_flags_are_refused_before_work(
    bench: ModuleType, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--cpu-smoke", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}={value}" in capsys.readouterr().err
