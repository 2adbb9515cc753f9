"""When a measurement every n optimizer steps happens: at the hook after the step, not in it."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["AfterStep"]


class AfterStep(Callback):
    """Calls ``measure(trainer, pl_module, step)`` for every multiple of ``every_n_steps`` (None: never).

    A step asks in ``on_train_batch_end`` and is measured at the next hook (the next batch's start, the
    epoch's end or training's end): the EMA callback's update of that step is then in, whatever the
    order of the callbacks. ``wants(trainer)`` narrows who measures (e.g. rank 0 only)."""

    every_n_steps: int | None = None
    _pending_step: int | None = None

    def wants(self, trainer: Trainer) -> bool:
        return True

    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        raise NotImplementedError

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self.wants(trainer):
            self._pending_step = step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step, self._pending_step = self._pending_step, None
        if step is not None:
            self.measure(trainer, pl_module, step)
