"""A callback for ``scripts/fault_drill.py``: records each finished optimizer step, and can slow steps.

The drill passes it to a training run as ``+callbacks.drill_clock._target_=drill_clock.StepClock`` (with
this folder on ``PYTHONPATH``): the drill reads the step a run had reached when a fault hit it from
``<run>/drill_steps.txt``, and a small per-step sleep lets a signal land at a chosen step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["NaNAtStep", "StepClock"]


class StepClock(Callback):
    """Appends ``global_step`` to ``<run>/drill_steps.txt`` after every optimizer step (flushed, so a
        SIGKILL loses nothing written), then sleeps ``sleep_s``. ``ballast_mb`` adds that many MB of zeros to
        every checkpoint (this callback's state), so that a write lasts long enough to be killed half-way.
    While the file ``hold`` exists the run waits after each step, however slow the machine is to start
    the process the drill races it against."""

    def __init__(self, sleep_s: float = 0.0, ballast_mb: int = 0, hold: str | None = None) -> None:
        self.sleep_s = sleep_s
        self.ballast_mb = ballast_mb
        self.hold = None if hold is None else Path(hold)

    def state_dict(self) -> dict[str, Any]:
        return {"ballast": torch.zeros(self.ballast_mb * 2**18)} if self.ballast_mb else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the ballast carries nothing

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            with (Path(trainer.default_root_dir) / "drill_steps.txt").open("a") as f:
                f.write(f"{trainer.global_step}\n")
                f.flush()
                os.fsync(f.fileno())
        time.sleep(self.sleep_s)
        while self.hold is not None and self.hold.exists():
            time.sleep(0.05)


class NaNAtStep(Callback):
    """Makes the data of the batch that would become optimizer step ``step`` NaN (in place, before the
    forward pass): the loss and every gradient of that step are non-finite, whatever the callbacks' order,
    and the finite guard must stop the run before the weights or a checkpoint see it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 == self.step:
            batch[0].fill_(float("nan"))
