"""One run per folder: ``run.lock`` in the run folder, held by the process that trains there.

Two runs writing the same ``checkpoints/last.ckpt`` and ``csv/metrics.csv`` corrupt each other
silently (a resumed job started twice, a requeued SLURM job beside a manual rerun). The lock is
created with ``os.open(O_CREAT | O_EXCL)``, atomic on POSIX file systems, and holds JSON: pid,
host, start time and the SLURM job id. A second run is refused with a ``ConfigError`` naming the
folder and the holder. A stale lock is taken over with a warning: same host and the pid is gone (a
run killed with SIGKILL), or the same SLURM job (a requeued job, maybe on another node, whose
previous attempt was killed before it could release it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from diffusionflow.errors import ConfigError

__all__ = ["LOCK_NAME", "RunLock", "pid_alive"]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _slurm_job() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


class RunLock:
    """``with RunLock(folder):`` holds ``folder/run.lock`` for the block, released on any exit."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def _info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slurm_job_id": _slurm_job(),
        }

    def _holder(self) -> dict[str, Any] | None:
        """The lock's content; ``None`` when unreadable (being written this instant, or damaged)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        host, pid = holder.get("host"), int(holder.get("pid") or 0)
        if host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid):
            return f"pid {pid} on {host} is no longer running"
        job = _slurm_job()
        if job is not None and holder.get("slurm_job_id") == job and pid != os.getpid():
            return f"it belongs to an earlier attempt of SLURM job {job} (requeued)"
        return None

    def _unreadable_reason(self) -> str | None:
        """An unreadable lock older than a few seconds: its writer died between creating and filling it."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "it disappeared"
        return f"it is unreadable and {age:.0f} s old" if age > 10 else None

    def acquire(self) -> None:
        """Creates the lock or raises ``ConfigError`` naming the folder and the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                reason = self._stale_reason(holder) if holder is not None else self._unreadable_reason()
                if reason is None:
                    who = "a process that is writing the lock now"
                    if holder is not None:
                        who = f"pid {holder.get('pid')} on host {holder.get('host')}"
                        who += f" (started {holder.get('started')})"
                    raise ConfigError(
                        f"run folder {self.folder} is in use by {who}: {self.path} exists. One run per "
                        "folder; allowed: wait for it, choose another folder (hydra.run.dir=...), or delete "
                        "the lock if that process is gone"
                    ) from None
                log.warning("taking over the stale lock %s: %s", self.path, reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise ConfigError(
            f"run folder {self.folder}: could not create {self.path} (another run keeps taking it)"
        )

    def release(self) -> None:
        """Removes the lock if this process holds it (never another process's)."""
        if not self.held:
            return
        holder = self._holder()
        if holder is None or holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
