"""Runs stopped by a signal (issue 10): ``python -m diffusionflow.train`` in a subprocess, signalled
mid-training. Before the fix a SIGTERM ended the run with status 0 and a sweep skipped its remaining
jobs silently; now: status 128+signum, ``checkpoints/last.ckpt`` loadable and resumable, an
``interrupted`` marker, ``sweep_interrupted.json`` naming the jobs not run, and SLURM's requeue signal
saving ``hpc_ckpt_<n>.ckpt`` and calling ``scontrol requeue``, with a second run continuing from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from train.conftest import FAST

LONG = "trainer.max_steps=100000"  # never reached: the signal comes first


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **extra}


def _start(args: list[str], env: dict[str, str] | None = None, multirun: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffusionflow.train", *(["-m"] if multirun else []), *FAST, *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or _env()
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``path`` exists (the run is training: the CSV logger writes after the first steps)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {path}:\n{proc.stdout.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _signal_mid_training(run: Path, signum: int, extra: list[str] = ()) -> tuple[int, str]:
    proc = _start([LONG, f"hydra.run.dir={run}", *extra])
    _wait_for(run / "csv" / "metrics.csv", proc)
    proc.send_signal(signum)
    return _finish(proc)


def test_sigterm_mid_training_exits_143_with_checkpoint_marker_and_resumes(tmp_path):
    """The worst case of the issue: SIGTERM exited 0. Now 143, last.ckpt (EMA + raw weights + loop
    state) and the marker; resuming continues from its step and the completed run removes the marker."""
    run = tmp_path / "run"
    code, out = _signal_mid_training(run, signal.SIGTERM)
    assert code == 143, out[-3000:]
    marker = json.loads((run / "interrupted").read_text())
    assert marker["signal"] == "SIGTERM" and marker["exit_code"] == 143
    assert marker["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert f"hydra.run.dir={run}" in marker["resume"] and "ckpt_path=" in marker["resume"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    step = ckpt["global_step"]
    assert step == marker["global_step"] >= 1
    assert "current_model_state" in ckpt and ckpt["state_dict"]  # raw weights beside the EMA ones
    assert ckpt["optimizer_states"] and ckpt["loops"], "the whole training state, asked for explicitly"
    assert "`weights_only` was not set" not in out, "Lightning's note on a save that did not say which"
    assert not (run / "run.lock").exists()  # released on the way out
    assert not (run / "metrics.json").exists()  # the final evaluation did not run

    proc = _start(
        [f"trainer.max_steps={step + 2}", f"hydra.run.dir={run}", f"ckpt_path={marker['checkpoint']}"]
    )
    code, out = _finish(proc)
    assert code == 0, out[-3000:]
    assert f"Restored all states from the checkpoint at {run / 'checkpoints' / 'last.ckpt'}" in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 2
    assert (run / "metrics.json").exists()
    assert not (run / "interrupted").exists()  # the completed run removed the earlier attempt's marker


def test_sigint_exits_130_with_checkpoint(tmp_path):
    """Ctrl+C takes the same path (a batch boundary, a checkpoint), not Lightning's exit status 1."""
    run = tmp_path / "run"
    code, out = _signal_mid_training(run, signal.SIGINT)
    assert code == 130, out[-3000:]
    marker = json.loads((run / "interrupted").read_text())
    assert marker["signal"] == "SIGINT"
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == marker["global_step"]
    )


def test_sweep_stopped_by_sigterm_exits_nonzero_and_names_the_jobs_not_run(tmp_path):
    """Basic launcher, 3 jobs, SIGTERM during job 0: before the fix the sweep exited 0 and jobs 1, 2
    were never run without a word."""
    proc = _start([LONG, "seed=0,1,2", f"hydra.sweep.dir={tmp_path}"], multirun=True)
    _wait_for(tmp_path / "0" / "csv" / "metrics.csv", proc)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 143, out[-3000:]
    info = json.loads((tmp_path / "sweep_interrupted.json").read_text())
    assert info["interrupted_job"] == 0 and info["signal"] == "SIGTERM"
    assert [(j["num"], j["overrides"][-1]) for j in info["not_run"]] == [(1, "seed=1"), (2, "seed=2")]
    assert "jobs not run" in out and "#1" in out and "#2" in out
    assert (tmp_path / "0" / "interrupted").exists() and (
        tmp_path / "0" / "checkpoints" / "last.ckpt"
    ).exists()
    assert not (tmp_path / "1").exists() and not (tmp_path / "2").exists()


def test_slurm_requeue_signal_saves_hpc_checkpoint_requeues_and_the_next_run_continues(tmp_path):
    """Simulated SLURM: a fake ``scontrol`` records its arguments; SIGUSR1 (the requeue signal of
    ``SLURMEnvironment(auto_requeue=True)``) saves ``hpc_ckpt_1.ckpt`` and requeues job 4242; the SIGTERM
    that follows exits 143 and leaves the newest state as ``hpc_ckpt_2.ckpt``; the requeued run (same
    folder, same environment, no ckpt_path) continues from it."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="1",
        SLURM_JOB_NAME="drill",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
    )
    run = tmp_path / "run"
    proc = _start([LONG, f"hydra.run.dir={run}"], env=env)
    _wait_for(run / "csv" / "metrics.csv", proc)
    proc.send_signal(signal.SIGUSR1)
    _wait_for(calls, proc)
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc1 = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert hpc1["global_step"] >= 1 and "current_model_state" in hpc1
    assert proc.poll() is None  # requeueing does not stop the run: SLURM's SIGTERM does
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 143, out[-3000:]
    hpc2 = torch.load(run / "hpc_ckpt_2.ckpt", weights_only=True)
    step = hpc2["global_step"]
    assert step >= hpc1["global_step"]
    assert json.loads((run / "interrupted").read_text())["slurm_job_id"] == "4242"

    proc = _start([f"trainer.max_steps={step + 2}", f"hydra.run.dir={run}"], env=env)
    code, out = _finish(proc)
    assert code == 0, out[-3000:]
    assert f"Restored all states from the checkpoint at {run / 'hpc_ckpt_2.ckpt'}" in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 2
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue
