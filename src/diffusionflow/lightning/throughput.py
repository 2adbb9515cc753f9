"""Training throughput in every run, measured without a host-device synchronisation per step.

Each rank notes ``time.perf_counter()`` at its training hooks: the wall time since the last logged
step, and within it the host time spent waiting for batches (from the end of one step to the start of
the next: the data loader, and whatever else runs between steps). On the steps whose metrics are
written (``trainer.log_every_n_steps``) the device is synchronised (CUDA only), and one
``all_gather`` brings every rank's two numbers together; the interval's validation is left out. Logged
at that step (also as a line of the run's log from global rank 0, and images/s in the progress bar):

* ``train/images_per_sec``: the training images of all ranks in the interval (every batch counted,
  gradient accumulation's too) / the longest rank's wall time;
* ``train/step_time_ms/max`` and ``/min``: wall time per optimizer step, the slowest and the fastest
  rank; ``train/data_time_ms/max`` and ``/min``: of it, the time waiting for data. A rank slow to load
  shows as a spread in data time (under DDP the others wait for it inside their step, at the gradient
  all-reduce, so step times stay equal); ranks out of step (a rank-0-only write) as a spread in step
  time. Two extremes rather than a key per rank: the columns stay the same on 1 or 64 GPUs;
* ``train/mfu`` (model FLOPs utilisation): achieved training FLOP/s per rank / the device's peak, where
  Lightning knows the peak (``get_available_flops``: CUDA, for the precision in use; nothing on CPU).
  The training FLOPs are 3 × the backbone's forward FLOPs (counted once, on one image, by
  ``torch.utils.flop_counter``; backward ≈ 2 × forward, the usual convention of MFU).

Lightning's ``ThroughputMonitor`` is not used: it synchronises the device after every batch and logs
from rank 0 only; its peak table is.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from diffusionflow.lightning.internals import logs_this_step

__all__ = ["WALL_CLOCK_KEYS", "TrainingThroughput", "training_flops_per_image"]

WALL_CLOCK_KEYS = (
    "train/images_per_sec",
    "train/step_time_ms/",
    "train/data_time_ms/",
    "train/mfu",
    "images/s",
)
"""The metrics this callback logs (prefixes): wall-clock measurements, which differ between identical runs."""

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"64": torch.float64, "32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}
"""The compute dtype of a ``trainer.precision`` by its part before ``-`` (``"bf16-mixed"``: bfloat16)."""


def training_flops_per_image(backbone: nn.Module, x: Tensor, labels: Tensor | None = None) -> float:
    """3 × the forward FLOPs of ``backbone`` on one image ``x[:1]`` (noise level 0, its labels): the
    FLOPs of a training step per image. Runs uncompiled, in eval mode (no dropout), under
    ``no_grad`` and a forked RNG: nothing of the run changes."""
    kwargs: dict[str, Any] = {"labels": None if labels is None else labels[:1]}
    if augment_dim := getattr(backbone, "augment_dim", 0):
        kwargs["augment_labels"] = x.new_zeros(1, augment_dim)
    was_training = backbone.training
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        backbone.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as count:
            backbone.forward(x[:1], x.new_zeros(1), **kwargs)  # forward: bypasses a compiled __call__
    finally:
        backbone.train(was_training)
    return 3.0 * count.get_total_flops()


class TrainingThroughput(Callback):
    """Logs ``train/images_per_sec``, ``train/{step,data}_time_ms/{max,min}`` and, where the peak is known,
    ``train/mfu`` on every logging step (see the module doc). ``mfu=False``: no FLOPs counted."""

    def __init__(self, mfu: bool = True) -> None:
        self.mfu = mfu
        self.peak_flops: int | None = None
        self.flops_per_image: float | None = None
        self._mark = self._batch_end = self._paused = 0.0
        self._mark_step = self._step_at_start = 0
        self._data_s = 0.0
        self._images = 0  # this rank's training images since the last logged step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.peak_flops, self.flops_per_image = None, None
        dtype = COMPUTE_DTYPES.get(str(trainer.precision).split("-")[0])
        if stage == "fit" and self.mfu and dtype is not None:
            self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._synchronize(pl_module)
        self._mark = self._batch_end = time.perf_counter()
        self._mark_step, self._data_s, self._images = trainer.global_step, 0.0, 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._data_s += time.perf_counter() - self._batch_end
        self._images += len(batch[0])
        self._step_at_start = trainer.global_step
        if self.peak_flops and self.flops_per_image is None:
            backbone = getattr(pl_module, "backbone", pl_module)
            labels = batch[1] if getattr(pl_module, "num_classes", 0) else None
            self.flops_per_image = training_flops_per_image(backbone, batch[0], labels)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step > self._step_at_start  # not a batch of gradient accumulation
        if stepped and logs_this_step(trainer):
            self._log(trainer, pl_module)
        self._batch_end = time.perf_counter()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:  # validation within training: not training time
            elapsed = time.perf_counter() - self._paused
            self._mark += elapsed
            self._batch_end += elapsed

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The interval since the last logged step: one synchronisation, one ``all_gather``."""
        self._synchronize(pl_module)
        now = time.perf_counter()
        steps = trainer.global_step - self._mark_step
        local = [now - self._mark, self._data_s, self._images]
        local = torch.tensor(local, dtype=torch.float32, device=pl_module.device)
        wall, data, images = trainer.strategy.all_gather(local).reshape(-1, 3).T.tolist()
        metrics = {
            "train/images_per_sec": sum(images) / max(wall),
            "train/step_time_ms/max": 1e3 * max(wall) / steps,
            "train/step_time_ms/min": 1e3 * min(wall) / steps,
            "train/data_time_ms/max": 1e3 * max(data) / steps,
            "train/data_time_ms/min": 1e3 * min(data) / steps,
        }
        if self.peak_flops and self.flops_per_image:
            per_rank = self.flops_per_image * sum(images) / max(wall) / len(images)
            metrics["train/mfu"] = per_rank / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)
        speed = metrics["train/images_per_sec"]  # and in the progress bar, a host tensor (read every refresh)
        pl_module.log(
            "images/s", torch.tensor(speed), prog_bar=True, logger=False, on_step=True, on_epoch=False
        )
        if trainer.is_global_zero:
            log.info(
                "step %d: %.1f images/s, %.1f ms/step (ranks: %.1f to %.1f), waiting for data %.1f ms/step "
                "(ranks: %.1f to %.1f)%s",
                trainer.global_step,
                speed,
                metrics["train/step_time_ms/max"],
                metrics["train/step_time_ms/min"],
                metrics["train/step_time_ms/max"],
                metrics["train/data_time_ms/max"],
                metrics["train/data_time_ms/min"],
                metrics["train/data_time_ms/max"],
                f", MFU {metrics['train/mfu']:.3f}" if "train/mfu" in metrics else "",
            )
        self._mark, self._mark_step, self._data_s, self._images = now, trainer.global_step, 0.0, 0

    @staticmethod
    def _synchronize(pl_module: LightningModule) -> None:
        """Waits for the device's queued work (CUDA), so that host time is device time."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
