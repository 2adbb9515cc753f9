"""Runs that survive a cluster: SIGTERM / SIGINT stop at a batch boundary with a checkpoint, a marker
file and a non-zero exit status; SLURM's requeue signal saves Lightning's ``hpc_ckpt_<n>.ckpt`` there too.

Why: Lightning 2.6 turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` *without a code*, so a
killed run exits 0 and a ``-m`` sweep with the basic launcher silently skips its remaining jobs. Here:

- ``InterruptCheckpoint`` (a callback, ``callbacks=default``) saves ``checkpoints/last.ckpt`` through
  the trainer (EMA, optimizer and loop state included) when the fit loop stops on a signal, and writes
  the run folder's ``interrupted`` marker (JSON: signal, step, time, checkpoint, how to resume). SIGINT
  takes the same path as SIGTERM (Lightning would raise ``KeyboardInterrupt`` anywhere, mid-step);
  a second SIGINT stops at once.
- SLURM (``SLURMEnvironment(auto_requeue=True)``, Lightning's default under ``srun``): the requeue
  signal (SIGUSR1) only sets a flag; at the next batch end every rank agrees on it and Lightning's own
  requeue routine runs (``hpc_ckpt_<n>.ckpt`` in the run folder, ``scontrol requeue $SLURM_JOB_ID``),
  not from inside the signal handler, where it could save half a step or mismatch DDP collectives.
  The SIGTERM that ends the requeued job then saves ``last.ckpt`` and links it as the next
  ``hpc_ckpt_<n>.ckpt``, so Lightning's automatic resume under SLURM takes the newest state.
- ``signal_guard`` (around a job in ``train.run``) covers the time outside the fit loop: a signal
  there raises ``RunInterrupted`` (forwarded first to ``ddp_spawn`` workers), and ``exit_code`` gives
  ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), what a shell reports for a process it killed.
- ``SweepJobs`` (a Hydra callback, ``launcher=local``) remembers the basic sweeper's job list, so an
  interrupted sweep can name the jobs it did not run (``sweep_interrupted.json``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shlex
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from diffusionflow.lightning.internals import cluster_environment, hpc_save_path, request_stop, slurm_requeue

__all__ = [
    "MARKER",
    "SWEEP_MARKER",
    "InterruptCheckpoint",
    "RunInterrupted",
    "SweepJobs",
    "exit_code",
    "remove_marker",
    "signal_guard",
    "write_marker",
    "write_sweep_marker",
]

log = logging.getLogger(__name__)

MARKER = "interrupted"
SWEEP_MARKER = "sweep_interrupted.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(BaseException):
    """A stop signal outside the fit loop. A ``BaseException`` (as ``KeyboardInterrupt``), so that
    ``except Exception`` in Lightning and Hydra lets it through to ``train.run``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class _State:
    """What this process has received; shared by the guard, the callback and ``train.run``."""

    signum: int | None = None
    received_at: float | None = None
    sigint_count: int = 0
    trainer: pl.Trainer | None = None  # set while the fit loop runs in this process
    requeue_pending: bool = False
    marker_written: Path | None = None
    sweep_jobs: list[list[str]] | None = None
    previous: dict[int, Any] = field(default_factory=dict)

    def record(self, signum: int) -> None:
        self.signum, self.received_at = signum, time.time()
        self.sigint_count += signum == signal.SIGINT


STATE = _State()


def exit_code(signum: int | None) -> int:
    """``128 + signum``, the status a shell gives a process killed by that signal (SIGTERM → 143)."""
    return 128 + int(signum if signum is not None else signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _forward_to_workers(signum: int) -> None:
    """Sends the signal on to this process's multiprocessing children (``ddp_spawn`` workers), which
    save and stop; otherwise the parent would wait forever for a result they never send."""
    for child in multiprocessing.active_children():
        if child.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(child.pid, signum)


def _guard_handler(signum: int, frame: FrameType | None) -> None:
    STATE.record(signum)
    if signum not in STOP_SIGNALS:  # SLURM's requeue signal outside the fit loop: nothing to save
        log.warning("received %s outside training: not requeued", signal.Signals(signum).name)
        return
    if STATE.trainer is not None:  # the callback's handler is normally in place then
        request_stop(STATE.trainer)
        return
    _forward_to_workers(signum)
    raise RunInterrupted(signum)


@contextmanager
def signal_guard() -> Iterator[None]:
    """SIGTERM and SIGINT (and SLURM's SIGUSR1, whose default action would kill the job) handled for
    one job: outside the fit loop they raise ``RunInterrupted``; the previous handlers come back after."""
    STATE.signum = STATE.received_at = None
    STATE.sigint_count, STATE.marker_written, STATE.requeue_pending = 0, None, False
    if not _main_thread():
        yield
        return
    signums = list(STOP_SIGNALS)
    if SLURMEnvironment.detect():
        signums.append(signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, _guard_handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _resume_command(out_dir: Path, ckpt: Path | None) -> str:
    """The command line that continues this run in its folder (the job's overrides, same folder)."""
    overrides: list[str] = []
    with suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    args = [*overrides, f"hydra.run.dir={out_dir}"]
    if ckpt is not None:
        args.append(f"ckpt_path={ckpt}")
    return "python -m diffusionflow.train " + " ".join(shlex.quote(a) for a in args)


def write_marker(out_dir: Path, signum: int | None, step: int | None, ckpt: Path | None) -> Path:
    """Writes ``<out_dir>/interrupted``: which signal, at which step and time, the checkpoint, how to
    resume. Written atomically (temporary file, rename) so a reader never sees half of it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = signal.Signals(signum).name if signum is not None else None
    info = {
        "signal": name,
        "signum": signum,
        "exit_code": exit_code(signum),
        "global_step": step,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "resume": _resume_command(out_dir, ckpt),
    }
    path = out_dir / MARKER
    tmp = path.with_name(f".{MARKER}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    STATE.marker_written = path
    log.warning("interrupted by %s at step %s; checkpoint %s; resume: %s", name, step, ckpt, info["resume"])
    return path


def remove_marker(out_dir: Path, name: str = MARKER, what: str = "run") -> None:
    """A completed run (or sweep) in ``out_dir`` removes the marker ``name`` of an earlier attempt."""
    path = out_dir / name
    if path.exists():
        path.unlink()
        log.info("%s completed: removed %s left by an earlier interrupted attempt", what, path)


def write_sweep_marker(sweep_dir: Path, job_num: int, signum: int | None) -> Path:
    """Writes ``<sweep_dir>/sweep_interrupted.json`` naming the interrupted job and the jobs not run
    (their numbers and overrides, from ``SweepJobs``; only their numbers' lower bound without it)."""
    jobs = STATE.sweep_jobs
    not_run: list[dict[str, Any]] | None = None
    if jobs is not None:
        not_run = [{"num": i, "overrides": jobs[i]} for i in range(job_num + 1, len(jobs))]
    info = {
        "signal": signal.Signals(signum).name if signum is not None else None,
        "interrupted_job": job_num,
        "not_run": not_run,
        "not_run_from": job_num + 1,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SWEEP_MARKER
    path.write_text(json.dumps(info, indent=2) + "\n")
    names = [f"#{j['num']} {' '.join(j['overrides'])}" for j in not_run] if not_run is not None else None
    log.error(
        "sweep interrupted during job %d: jobs not run: %s (%s)",
        job_num,
        names if names is not None else f"every job after #{job_num}",
        path,
    )
    return path


class SweepJobs(HydraCallback):
    """Hydra callback: the basic sweeper's job list (overrides per job, in order) at multirun start,
    recomputed as ``BasicSweeper.sweep`` does, so an interrupted sweep can name the jobs it skips."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        STATE.sweep_jobs = None
        try:
            from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
            from hydra.core.override_parser.overrides_parser import OverridesParser

            hc = config.hydra
            if "BasicSweeper" not in str(hc.sweeper.get("_target_", "")):
                return
            params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items()]
            parsed = OverridesParser.create().parse_overrides([*params, *hc.overrides.task])
            batches = BasicSweeper.split_arguments(parsed, None)
            STATE.sweep_jobs = [list(job) for batch in batches for job in batch]
        except Exception:  # the list is a convenience; the sweep marker says "after #n" without it
            log.debug("could not list the sweep's jobs", exc_info=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job ran (an interrupted sweep never gets here): the marker of an earlier attempt goes."""
        remove_marker(Path(config.hydra.sweep.dir), SWEEP_MARKER, "sweep")


class InterruptCheckpoint(Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` and writes the ``interrupted`` marker when the fit loop stops
    on SIGTERM or SIGINT; defers SLURM's requeue checkpoint to a batch boundary (see the module doc).

    Args:
        dirpath: the checkpoint folder (``${paths.output_dir}/checkpoints``, as ``ModelCheckpoint``'s).
        filename: the checkpoint name without ``.ckpt``; ``last`` overwrites ``last.ckpt`` (atomically,
            through the trainer's checkpoint IO), which is what a resume reads.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        if not filename or filename.endswith(".ckpt"):
            from diffusionflow.errors import ConfigError

            raise ConfigError(
                f"callbacks.interrupt.filename={filename!r}: allowed a non-empty name without '.ckpt'"
            )
        self.dirpath = Path(dirpath)
        self.filename = filename
        self._previous: dict[int, Any] = {}
        self._requeue_signal: int | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    # -- signal handlers, installed for the fit loop only ------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        STATE.record(signum)
        if signum == self._requeue_signal:
            STATE.requeue_pending = True  # acted on at the next batch end
            return
        if signum == signal.SIGINT and STATE.sigint_count > 1:
            raise RunInterrupted(signum)  # a second Ctrl+C: stop now, no checkpoint
        if STATE.trainer is not None:  # Lightning raises SIGTERMException at the next batch boundary
            request_stop(STATE.trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Installs the handlers before Lightning registers its own (``_run`` does after this hook):
        Lightning then calls ours after its SIGTERM notifier, and leaves SLURM's requeue signal to us."""
        STATE.trainer = trainer
        STATE.requeue_pending = False
        if not _main_thread():
            return
        env = cluster_environment(trainer)
        self._requeue_signal = None
        signums: list[int] = list(STOP_SIGNALS)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            self._requeue_signal = int(env.requeue_signal)
            signums.append(self._requeue_signal)
        self._previous = {s: signal.getsignal(s) for s in signums}
        for s in signums:
            signal.signal(s, self._on_signal)

    def _restore(self) -> None:
        STATE.trainer = None
        if _main_thread():
            for s, handler in self._previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """SLURM's requeue, at a batch boundary and on every rank at the same step."""
        if self._requeue_signal is None:
            return
        pending = STATE.requeue_pending
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            STATE.requeue_pending = False
            # Lightning's routine: hpc_ckpt_<n>.ckpt in default_root_dir, scontrol requeue on rank 0
            slurm_requeue(trainer, self._requeue_signal)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """On Lightning's ``SIGTERMException`` (raised at a batch or epoch boundary, on every rank at
        the same step): checkpoint, marker. Other exceptions can come mid-step: nothing is saved."""
        try:
            if isinstance(exception, SIGTERMException):
                self._save(trainer)
        finally:
            self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _save(self, trainer: pl.Trainer) -> None:
        signum = STATE.signum if STATE.signum is not None else int(signal.SIGTERM)
        # every rank: the strategy gathers and rank 0 writes; the full state (optimizer, loops, callbacks)
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        if not trainer.is_global_zero:
            return
        env = cluster_environment(trainer)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            # the newest state as the next hpc checkpoint, so the requeued job resumes from it
            hpc = Path(hpc_save_path(trainer))
            try:
                os.link(self.ckpt_path, hpc)
            except OSError:
                import shutil

                shutil.copyfile(self.ckpt_path, hpc)
            log.info("SLURM: %s linked as %s for the requeued job", self.ckpt_path, hpc)
        write_marker(Path(trainer.default_root_dir), signum, trainer.global_step, self.ckpt_path)
        if multiprocessing.parent_process() is not None and signum in STOP_SIGNALS:
            # a ddp_spawn worker: the parent waits for a result that will not come; tell it to stop
            with suppress(ProcessLookupError):
                os.kill(os.getppid(), signum)
