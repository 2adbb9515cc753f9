"""Post-hoc EMA during training (Karras et al. 2024, EDM2, §3): power-function averages of the weights for
a few σ_rel, saved as snapshots from which an EMA of another length is reconstructed after training
(the maths: :mod:`diffusionflow.core.posthoc_ema`; loading: ``load_module(path, weights="sigma_rel:0.1")``).

It runs beside ``callbacks.ema`` (the half-life EMA that sampling and evaluation use by default) and is
independent of it. After every optimizer step each profile k is updated,
θ̂_k ← β θ̂_k + (1 − β) θ with β = (1 − Δt/t)^{γ_k+1}, t counting training images and Δt the global batch
(:func:`~diffusionflow.lightning.ema.images_per_step`), so θ̂_k is the power-function average of the
weights up to t exactly (one ``torch._foreach_lerp_`` per profile, no host-device synchronisation).
Every ``snapshot_every_n_steps`` optimizer steps and when training ends, global rank 0 writes each
profile to ``<run_dir>/ema_snapshots/ema-<step:08d>-<sigma_rel>.pt`` (``run_dir`` is
``trainer.default_root_dir``, the folder of ``checkpoints/``), atomically: a dict of plain tensors and
numbers, ``{"state_dict", "t_images", "gamma", "sigma_rel", "step"}``, read with
``torch.load(weights_only=True)``. Floating tensors are averaged, others (integer buffers) copied. As for
checkpoints, a snapshot holding a NaN or an infinity is never written (``NonFiniteError``).

The averages and counters are the callback's state in the trainer's checkpoints, so a resumed run
continues the same profiles; a checkpoint saved before this callback's update of its last step (a
callback ordered before it saved at that step's end) gets that update at the resume, from the restored
weights, which are the ones it missed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffusionflow.core.posthoc_ema import beta, gamma_of_sigma_rel
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import non_finite_entries
from diffusionflow.lightning.ema import images_per_step
from diffusionflow.lightning.finite_guard import NonFiniteError
from diffusionflow.paths import replace_atomically

__all__ = ["SNAPSHOT_DIR", "SNAPSHOT_NAME", "STATE_KEY", "PostHocEMA", "snapshot_name"]

SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_NAME = re.compile(r"ema-(?P<step>\d+)-(?P<sigma_rel>[0-9.e+-]+)\.pt")
STATE_KEY = "PostHocEMA"
"""The key of the callback's state in a checkpoint's ``callbacks``."""


def snapshot_name(step: int, sigma_rel: float) -> str:
    """``ema-<step:08d>-<sigma_rel>.pt``, e.g. ``ema-00012000-0.05.pt``."""
    return f"ema-{step:08d}-{sigma_rel:g}.pt"


def _floats(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies of the floating tensors, in at least float32 (bf16 weights average in float32)."""
    return {
        k: v.detach().to(torch.promote_types(v.dtype, torch.float32), copy=True)
        for k, v in state.items()
        if v.is_floating_point()
    }


class PostHocEMA(Callback):
    """Tracks power-function EMAs of the weights, one per ``sigma_rels`` (EDM2: 0.05 and 0.10), and writes
    them every ``snapshot_every_n_steps`` optimizer steps (None: never) and when training ends (see the
    module doc)."""

    def __init__(
        self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every_n_steps: int | None = 1000
    ) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(
                f"posthoc_ema.sigma_rels={list(self.sigma_rels)}: allowed one or more distinct values"
            )
        self.gammas = tuple(gamma_of_sigma_rel(s) for s in self.sigma_rels)
        if snapshot_every_n_steps is not None and snapshot_every_n_steps < 1:
            raise ConfigError(
                f"posthoc_ema.snapshot_every_n_steps={snapshot_every_n_steps}: allowed an integer >= 1, or "
                "null (snapshots when training ends only)"
            )
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.images_per_update = 1.0
        self.t_images = 0.0
        self.step = 0
        """The optimizer step of the last update; t_images the training images seen by then."""
        self.averages: list[dict[str, Tensor]] = []
        """Per profile, the average of the floating tensors of the module's state dict; [] before training."""
        self._written_step: int | None = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.images_per_update = float(images_per_step(trainer, stage))
            self.averages, self._written_step = [], None  # a resume loads its state after this

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The profiles from the checkpoint (on resume), else from the current weights at
        t = global_step · Δt; then the update the checkpoint may have been saved before."""
        current = pl_module.state_dict()
        if not self.averages:
            self.step, self.t_images = trainer.global_step, trainer.global_step * self.images_per_update
            self.averages = [_floats(current) for _ in self.sigma_rels]
        else:
            self.averages = [{k: v.to(current[k].device) for k, v in avg.items()} for avg in self.averages]
        if trainer.global_step > self.step:
            self._update(pl_module, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self.step:  # not before the optimizer steps (gradient accumulation)
            self._update(pl_module, trainer.global_step)
            if self.snapshot_every_n_steps and self.step % self.snapshot_every_n_steps == 0:
                self._write(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.averages and self._written_step != self.step:
            self._write(trainer, pl_module)

    @torch.no_grad()
    def _update(self, pl_module: LightningModule, step: int) -> None:
        """θ̂_k ← β θ̂_k + (1 − β) θ for each profile, with β = (1 − Δt/t)^{γ_k+1} at the new t."""
        dt = (step - self.step) * self.images_per_update
        self.step, self.t_images = step, self.t_images + dt
        current = pl_module.state_dict()
        for average, gamma in zip(self.averages, self.gammas, strict=True):
            values = list(average.values())
            sources = [current[name].to(value.dtype) for name, value in average.items()]
            torch._foreach_lerp_(values, sources, 1.0 - beta(self.t_images, dt, gamma))

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Each profile's snapshot at the current step (global rank 0)."""
        self._written_step = self.step
        if not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / SNAPSHOT_DIR
        current = pl_module.state_dict()
        for sigma_rel, gamma, average in zip(self.sigma_rels, self.gammas, self.averages, strict=True):
            weights = {k: average.get(k, v).detach().cpu() for k, v in current.items()}
            path = folder / snapshot_name(self.step, sigma_rel)
            if bad := non_finite_entries({"state_dict": weights}):
                raise NonFiniteError(
                    f"refusing to write {path}: {', '.join(bad[:3])} hold NaN or infinite values"
                )
            snapshot = {
                "state_dict": weights,
                "t_images": self.t_images,
                "gamma": gamma,
                "sigma_rel": sigma_rel,
                "step": self.step,
            }
            replace_atomically(path, partial(torch.save, snapshot))

    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.sigma_rels),
            "t_images": self.t_images,
            "step": self.step,
            "averages": self.averages,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["sigma_rels"]) != list(self.sigma_rels):
            raise ConfigError(
                f"callbacks.posthoc_ema.sigma_rels={list(self.sigma_rels)}, but the checkpoint tracks "
                f"{list(state_dict['sigma_rels'])}: the profiles of a run cannot change when it resumes; "
                f"allowed: {list(state_dict['sigma_rels'])}"
            )
        self.t_images, self.step = float(state_dict["t_images"]), int(state_dict["step"])
        self.averages = [dict(avg) for avg in state_dict["averages"]]
