"""Hydra multiruns through the real command line: one folder, CSV and W&B run per job; a failing
job does not stop the others and leaves its error in its folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusionflow.compare import main as compare_main
from train.conftest import FAST


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "diffusionflow.train", "-m", *FAST, *args, f"hydra.sweep.dir={tmp_path}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_weighting_sweep_four_jobs_with_wandb(tmp_path):
    res = run_cli(["weighting=edm,sd3,flow,cosine_v", "logger=[csv,wandb]"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    run_ids = set()
    for job in jobs:
        assert (job / "csv" / "metrics.csv").exists() and (job / "metrics.json").exists()
        run_id = (job / "wandb_run_id.txt").read_text().strip()
        offline_runs = list((job / "wandb").glob(f"offline-run-*-{run_id}"))
        assert len(offline_runs) == 1, list((job / "wandb").iterdir())
        assert f"W&B run {run_id} in group {tmp_path.name}" in (job / "train.log").read_text()
        run_ids.add(run_id)
    assert len(run_ids) == 4  # wandb.finish() after every job: no run is reused
    assert "weighting: edm" in (tmp_path / "0" / ".hydra" / "overrides.yaml").read_text().replace("=", ": ")
    # the offline run's record holds the group, a tag per resolved component and the final metrics;
    # the samples and weighting pictures are its media
    record = next((jobs[1] / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    for text in (
        tmp_path.name,
        "weighting:sd3",
        "schedule:flow",
        "prediction:flow",
        "proposal:logit_normal",
        "sampler:heun",
        "data:toy2d",
        "backbone:mlp",
        "final/sliced_w2",
    ):
        assert text.encode() in record, text
    media = {
        p.name.split("_")[0] for p in (jobs[1] / "wandb").glob("offline-run-*/files/media/images/final/*")
    }
    assert media == {"samples", "weighting"}
    # and the comparison command reads the sweep: one row per weighting
    rows = compare_main([str(tmp_path)])
    assert [r.label for r in rows] == [f"weighting={w}" for w in ("edm", "sd3", "flow", "cosine_v")]
    assert all(r.n == 1 and math.isfinite(r.mean_std("final/sliced_w2")[0]) for r in rows)


@pytest.mark.slow
def test_optuna_search_over_the_sigmoid_bias(tmp_path):
    overrides = [
        "hparams_search=sigmoid_bias_optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
    ]
    res = run_cli(overrides, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    trials = {}
    for job in sorted(p for p in tmp_path.iterdir() if p.name.isdigit()):
        b = next(
            o
            for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            if o.startswith("weighting.b=")
        )
        trials[float(b.split("=")[1])] = json.loads((job / "metrics.json").read_text())["final/sliced_w2"]
    assert len(trials) == 3 and all(-4.0 <= b <= 6.0 for b in trials)
    assert best["best_value"] == pytest.approx(min(trials.values()))
    assert trials[best["best_params"]["weighting.b"]] == pytest.approx(best["best_value"])


@pytest.mark.slow
def test_failing_job_does_not_stop_the_sweep(tmp_path):
    res = run_cli(["trainer.max_steps=3,-5,3"], tmp_path)
    assert res.returncode != 0
    assert (tmp_path / "0" / "metrics.json").exists() and (tmp_path / "2" / "metrics.json").exists()
    error = (tmp_path / "1" / "error.log").read_text()
    assert "trainer.max_steps=-5: expected an integer >= -1" in error
