"""One run per folder (issue 10): ``run.lock`` refuses a second run, a stale lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from diffusionflow.errors import ConfigError
from diffusionflow.runlock import RunLock
from diffusionflow.train import run as run_job
from train.conftest import compose_train
from train.test_interrupt import LONG, _finish, _start, _wait_for


def _write_lock(folder, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": "then", "slurm_job_id": None}
    (folder / "run.lock").write_text(json.dumps(info))


def test_lock_held_by_a_live_process_is_refused(tmp_path):
    _write_lock(tmp_path, os.getpid())
    with pytest.raises(ConfigError, match=rf"run folder {tmp_path} is in use by pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["started"] == "then"  # untouched


def test_lock_of_another_host_is_refused(tmp_path):
    _write_lock(tmp_path, 1, host="elsewhere")
    with pytest.raises(ConfigError, match="pid 1 on host elsewhere"):
        RunLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_pid_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert f"pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / "run.lock").exists()


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / "run.lock").exists()


def test_second_concurrent_run_in_a_folder_is_refused_before_writing(tmp_path):
    run = tmp_path / "run"
    first = _start([LONG, f"hydra.run.dir={run}"])
    try:
        _wait_for(run / "csv" / "metrics.csv", first)  # training: config_resolved.yaml is written
        resolved = (run / "config_resolved.yaml").stat().st_mtime_ns
        with pytest.raises(ConfigError, match=rf"run folder {run} is in use by pid {first.pid} on host"):
            run_job(compose_train(["trainer.max_steps=2"], run))  # the second run, in this process
        # refused before any of its own writes (Hydra's .hydra/ and log aside)
        assert (run / "config_resolved.yaml").stat().st_mtime_ns == resolved
        assert not (run / "error.log").exists()
        assert json.loads((run / "run.lock").read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        code, out = _finish(first)
    assert code == 143, out[-3000:]
