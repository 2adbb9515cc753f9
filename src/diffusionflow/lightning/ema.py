"""EMA of the weights, on Lightning's own ``WeightAveraging`` (Lightning ≥ 2.6).

Lightning keeps the averaged weights in the checkpoint's ``state_dict`` and the raw ones in
``current_model_state``: validation and the end of training use the EMA weights, and resuming
continues from the raw ones. We add EDM's parameterisation by a half-life in images (Karras et al.
2022, App. F.2; ``training_loop.py``): per step β = 0.5^(B / h) with B the global batch, and the
optional ramp-up h ← min(h, ramp · images seen). Each update is one ``torch._foreach_lerp_`` over the
floating parameters and buffers (integer buffers are copied), with β computed on the host from a count
of updates read off the device once a fit: no host-device synchronisation per step (Lightning's own
path, ``AveragedModel.update_parameters``, reads its device counter twice an update).

Other callbacks reach the two sets of weights through this module only, whatever the order of
``trainer.callbacks``:

* :func:`averaged_model` (from ``lightning.internals``, the one module touching Lightning's private
  attributes): the averaged copy (the EMA weights), a module of its own that is correct before and
  after Lightning's end-of-training copy into the LightningModule.
* :func:`raw_weights`: the LightningModule with the raw (trained) weights, also after ``EMA`` replaced
  them by the averaged ones at ``on_train_end`` (``EMA`` keeps what it replaced).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from diffusionflow.lightning.internals import averaged_model, averaging, latest_update_step

__all__ = ["EMA", "averaged_model", "images_per_step", "raw_weights"]


class EMA(WeightAveraging):
    """EMA with either ``half_life_images`` (EDM) or a constant ``decay`` per step."""

    def __init__(
        self,
        half_life_images: float | None = None,
        decay: float | None = None,
        rampup_ratio: float | None = None,
        update_every_n_steps: int = 1,
    ) -> None:
        if (half_life_images is None) == (decay is None):
            raise ValueError(
                f"ema: give exactly one of half_life_images={half_life_images} and decay={decay}"
            )
        if half_life_images is not None and half_life_images <= 0:
            raise ValueError(f"ema.half_life_images={half_life_images} must be > 0")
        if decay is not None and not 0 <= decay < 1:
            raise ValueError(f"ema.decay={decay} must be in [0, 1)")
        if update_every_n_steps < 1:
            raise ValueError(f"ema.update_every_n_steps={update_every_n_steps} must be >= 1")
        super().__init__(use_buffers=True)
        self.half_life_images, self.decay, self.rampup_ratio = half_life_images, decay, rampup_ratio
        self.update_every_n_steps = update_every_n_steps
        self.images_per_update = 1.0
        self._updates_done = 0
        """Host copy of the averaged model's update count (``n_averaged``), read off the device once a fit."""
        self.replaced_raw: dict[str, Tensor] | None = None
        """The raw weights that ``on_train_end`` replaced by the averaged ones (None before)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.replaced_raw = None
        self.images_per_update = float(images_per_step(trainer, stage) * self.update_every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._updates_done = int(averaging(self).n_averaged)  # after a resume restored it: once a fit

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.replaced_raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def beta(self, updates_done: int) -> float:
        """The decay of the next update, after ``updates_done`` updates."""
        if self.decay is not None:
            return self.decay
        half_life = self.half_life_images
        if self.rampup_ratio is not None:
            half_life = min(half_life, self.rampup_ratio * updates_done * self.images_per_update)
        return 0.5 ** (self.images_per_update / max(half_life, 1e-8))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``WeightAveraging``'s test of when to update, with :meth:`update` doing it in place of
        ``AveragedModel.update_parameters``, which reads its device counter twice an update."""
        step = trainer.global_step
        if step > latest_update_step(self) and self.should_update(step_idx=step - 1):
            self.update(pl_module)
            latest_update_step(self, step)

    @torch.no_grad()
    def update(self, pl_module: LightningModule) -> None:
        """ê ← w at the first update, then ê ← β ê + (1 − β) w with β of the updates done, over the
        parameters and buffers: one ``_foreach_lerp_`` for the floating ones (integer buffers copied)."""
        average = averaging(self)
        pairs = list(
            zip(
                [*average.module.parameters(), *average.module.buffers()],
                [*pl_module.parameters(), *pl_module.buffers()],
                strict=True,
            )
        )
        lerped = [(e, w) for e, w in pairs if e.is_floating_point() and self._updates_done > 0]
        copied = [(e, w) for e, w in pairs if not (e.is_floating_point() and self._updates_done > 0)]
        if lerped:
            ema, weights = zip(*lerped, strict=True)
            torch._foreach_lerp_(list(ema), list(weights), 1.0 - self.beta(self._updates_done))
        if copied:
            ema, weights = zip(*copied, strict=True)
            torch._foreach_copy_(list(ema), list(weights))
        average.n_averaged += 1  # on its device: no synchronisation
        self._updates_done += 1

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0


def images_per_step(trainer: Trainer, stage: str) -> int:
    """Training images per optimizer step: the DataModule's per-rank batch × world size × gradient
    accumulation (a per-rank batch of 1 without a DataModule). Sets the DataModule up if it has not been."""
    per_rank = getattr(trainer.datamodule, "per_rank_batch_size", None) if trainer.datamodule else None
    if per_rank is None and trainer.datamodule is not None:
        trainer.datamodule.setup(stage)
        per_rank = trainer.datamodule.per_rank_batch_size
    return (per_rank or 1) * trainer.world_size * trainer.accumulate_grad_batches


@contextmanager
def raw_weights(callback: WeightAveraging | None, pl_module: LightningModule) -> Iterator[LightningModule]:
    """``pl_module`` with its raw (trained) weights. During training that is ``pl_module`` as it is; after
    :class:`EMA` replaced them at ``on_train_end``, its kept raw weights are loaded for the duration of the
    ``with`` block and the averaged ones put back afterwards. (Lightning's own ``WeightAveraging`` keeps
    nothing: after its end-of-training copy ``pl_module`` holds the averaged weights.)"""
    kept = getattr(callback, "replaced_raw", None)
    if kept is None:
        yield pl_module
        return
    averaged = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    pl_module.load_state_dict(kept)
    try:
        yield pl_module
    finally:
        pl_module.load_state_dict(averaged)
