"""Stop (or skip) a training step whose loss or gradients are not finite.

A diverging run (``model.optimizer.lr=1e6``) used to train to ``max_steps`` on NaN, overwrite
``last.ckpt`` with NaN weights and write NaN samples and metrics. :class:`FiniteGuard` looks at the
step's loss and gradients just before the optimizer step (``on_before_optimizer_step``, after the
backward pass and before gradient clipping and the step itself):

* ``policy="stop"`` raises :class:`NonFiniteError` naming the first non-finite step, what was not finite
  there (the loss, the gradients of which parameters) and the log-SNR (λ) range of its batch. The check
  costs no host-device synchronisation per step: each step's verdict and description are folded into a
  few device tensors, read on the steps whose metrics are written (``trainer.log_every_n_steps``), before
  every checkpoint is saved (``on_save_checkpoint``: the run stops instead, so no checkpoint ever holds
  the non-finite step's weights) and at the end of each epoch. A run therefore trains on for at most
  ``log_every_n_steps - 1`` steps past the non-finite one before it stops, and writes nothing from them
  but log rows (NaN losses; a measurement every n steps may be NaN): no checkpoint, post-hoc EMA
  snapshot (it refuses non-finite weights itself), final evaluation or ``metrics.json``.
* ``policy="skip"`` drops the gradients (every one set to ``None``), so the optimizer step changes
  neither the weights nor the optimizer state (Adam's moments and step count); ``max_skips``
  consecutive skips are allowed, one more raises :class:`NonFiniteError`. The skipped step still
  counts as a step (``global_step``, the learning-rate schedule and the training noise move on), and
  what ``training_step`` did before the check stays done: its NaN loss is in the logged loss and the
  λ-bin statistics of that step. The decision to skip is taken before the optimizer step, on the host:
  one host-device synchronisation per step (on a GPU, the cost of this policy).

With 16-bit mixed precision (a gradient scaler) infinite gradients are the scaler's business (it skips
the step and lowers the scale), so only the loss is checked. Under DDP every rank takes the same
decision (any rank's non-finite loss counts for all), from one all-reduce at each check (``skip``: each
step).

The module's ``training_step`` leaves the loss in ``last_loss`` and the batch's λ in ``last_logsnr``
(``DiffusionModule`` does); a module without them is checked on its gradients only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffusionflow.errors import ConfigError
from diffusionflow.lightning.internals import logs_this_step

__all__ = ["POLICIES", "FiniteGuard", "NonFiniteError"]

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
SHOWN_PARAMETERS = 3
HEAD = 5  # step, epoch, λ min, λ max, loss: the numbers of a step before its gradient norms


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity (loss, gradients, or weights about to be saved)."""


def _logsnr_range(pl_module: LightningModule) -> str:
    """``λ ∈ [lo, hi]`` of the batch the module last trained on, or a note that it is unknown."""
    logsnr = getattr(pl_module, "last_logsnr", None)
    if not isinstance(logsnr, Tensor) or logsnr.numel() == 0:
        return "λ range of the batch unknown"
    lo, hi = logsnr.detach().double().aminmax()
    return f"batch λ (log-SNR) in [{lo.item():.3g}, {hi.item():.3g}]"


def _parameter_names(pl_module: LightningModule) -> dict[int, str]:
    return {id(p): name for name, p in pl_module.named_parameters()}


def _describe(loss: float | None, bad_parameters: list[str]) -> str:
    """``loss (nan)`` (``loss``: the non-finite value, or None) and/or ``gradient of a.weight, b.bias (and 3
    more)``; empty if neither."""
    parts = [] if loss is None else [f"loss ({loss})"]
    if bad_parameters:
        extra = len(bad_parameters) - SHOWN_PARAMETERS
        more = f" (and {extra} more)" if extra > 0 else ""
        parts.append(f"gradient of {', '.join(bad_parameters[:SHOWN_PARAMETERS])}{more}")
    return " and ".join(parts)


class FiniteGuard(Callback):
    """Checks the loss and the gradients of every optimizer step; ``policy`` ``stop`` or ``skip``.

    Args:
        policy: ``stop`` raises :class:`NonFiniteError` at the first non-finite step (checked without a
            per-step synchronisation, see the module doc); ``skip`` drops that step's gradients (no weight
            or optimizer-state change).
        max_skips: with ``skip``, the most consecutive skipped steps; one more stops the run.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        if policy not in POLICIES:
            raise ConfigError(
                f"callbacks.finite_guard.policy={policy!r} is unknown; allowed: {list(POLICIES)}"
            )
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ConfigError(f"callbacks.finite_guard.max_skips={max_skips!r} must be an integer >= 0")
        self.policy, self.max_skips = policy, max_skips
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []  # the global steps skipped in this process
        self._first_bad: Tensor | None = None
        """``stop``, on the device: (step, epoch, λ min, λ max, loss, ‖g_i‖_∞ …) of the first non-finite
        step (``HEAD`` numbers, then one per parameter of ``_checked``); NaN while every step was finite."""
        self._checked: list[Tensor] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._first_bad, self._checked = None, []

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        loss = getattr(pl_module, "last_loss", None)
        loss = loss.detach() if isinstance(loss, Tensor) else None
        if self.policy == "skip":
            self._skip_or_stop(trainer, pl_module, loss, params, check_grads)
            return
        checked = [p for p in params if p.grad is not None] if check_grads else []
        self._remember(trainer, pl_module, loss, checked)
        if logs_this_step(trainer):
            self.check(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer, pl_module)  # every rank saves (Trainer.save_checkpoint), so every rank checks

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer, pl_module)

    def _remember(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor | None, params: list[Tensor]
    ) -> None:
        """``stop``: folds this step into ``_first_bad`` with device operations only (no synchronisation):
        its row replaces the NaN one if it is the first whose loss or a gradient is not finite (the ∞-norm
        max |g| is NaN or ∞ exactly when g holds one, and cannot overflow)."""
        if loss is None and not params:
            return
        device = loss.device if loss is not None else params[0].grad.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        checked = [torch.zeros(1, dtype=dtype, device=device) if loss is None else loss.reshape(1).to(dtype)]
        if params:
            norms = torch._foreach_norm([p.grad.detach() for p in params], float("inf"))
            checked.append(torch.stack(norms).to(device, dtype))
        values = torch.cat(checked)
        logsnr = getattr(pl_module, "last_logsnr", None)
        if isinstance(logsnr, Tensor) and logsnr.numel() > 0:
            lam = torch.stack(logsnr.detach().aminmax()).to(device, dtype)
        else:
            lam = torch.full((2,), torch.nan, dtype=dtype, device=device)
        when = torch.tensor([trainer.global_step, trainer.current_epoch], dtype=dtype)
        row = torch.cat([when.to(device, non_blocking=True), lam, values])
        if self._first_bad is None or len(self._first_bad) != len(row):  # a new set of parameters: keep the
            head = torch.full((HEAD,), torch.nan, dtype=dtype, device=device)  # first step, not its norms
            head = head if self._first_bad is None else self._first_bad[:HEAD]
            self._first_bad = torch.cat([head, torch.zeros(len(row) - HEAD, dtype=dtype, device=device)])
        self._checked = params
        first = torch.isnan(self._first_bad[0]) & ~torch.isfinite(values).all()
        self._first_bad = torch.where(first, row, self._first_bad)

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``stop``: raises :class:`NonFiniteError` if a rank trained on a non-finite step. One
        synchronisation and, under DDP, one all-reduce: every rank calls it at the same point (the steps
        whose metrics are written, each checkpoint save, each epoch's end)."""
        if self.policy != "stop":
            return
        record = self._first_bad
        if record is None:
            record = torch.full((HEAD,), torch.nan, dtype=torch.float64, device=pl_module.device)
        when = torch.nan_to_num(record[:2], nan=math.inf)
        step, epoch = trainer.strategy.reduce(when, reduce_op="min").tolist()
        if math.isinf(step):
            return
        values = record.tolist()
        what, lam = "loss or gradient on another rank", "λ range of the batch unknown"
        if values[0] == step:  # this rank's: describe it
            names = _parameter_names(pl_module)
            norms = zip(self._checked, values[HEAD:], strict=False)
            bad = [names.get(id(p), "<unnamed>") for p, norm in norms if not math.isfinite(norm)]
            what = _describe(None if math.isfinite(values[4]) else values[4], bad) or "gradient"
            if not math.isnan(lo := values[2]):
                lam = f"batch λ (log-SNR) in [{lo:.3g}, {values[3]:.3g}]"
        raise NonFiniteError(
            f"non-finite {what} at global step {int(step)} (epoch {int(epoch)}), {lam}: training stopped; "
            "no checkpoint holds weights trained on it. Lower model.optimizer.lr, set "
            "trainer.gradient_clip_val, or set callbacks.finite_guard.policy=skip"
        )

    def _skip_or_stop(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        loss: Tensor | None,
        params: list[Tensor],
        check_grads: bool,
    ) -> None:
        """``skip``: decides on the host, this step, whether to drop its gradients (one synchronisation)."""
        grads = [p.grad.detach() for p in params if p.grad is not None]
        flags = [torch.isfinite(loss).all()] if loss is not None else []
        if check_grads and grads:
            flags.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))
        bad = bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive_skips = 0
            return
        names = _parameter_names(pl_module)
        bad_names = [
            names.get(id(p), "<unnamed>")
            for p in (params if check_grads else [])
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        finite_loss = loss is None or bool(torch.isfinite(loss).all())
        what = _describe(None if finite_loss else loss.double().mean().item(), bad_names)
        what = what or "loss or gradient on another rank"
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.consecutive_skips < self.max_skips:
            for p in params:
                p.grad = None
            self.consecutive_skips += 1
            self.skipped_steps.append(trainer.global_step)
            log.warning(
                "non-finite %s at %s, %s: step skipped (%d consecutive of at most %d, "
                "callbacks.finite_guard.max_skips)",
                what,
                where,
                _logsnr_range(pl_module),
                self.consecutive_skips,
                self.max_skips,
            )
            return
        raise NonFiniteError(
            f"non-finite {what} at {where}, {_logsnr_range(pl_module)}: training stopped after "
            f"{self.consecutive_skips} consecutive skipped steps (callbacks.finite_guard.max_skips="
            f"{self.max_skips}); the weights and checkpoints are those of the last finite step. Lower "
            "model.optimizer.lr, or set trainer.gradient_clip_val"
        )

    def state_dict(self) -> dict[str, Any]:
        """The running count of consecutive skips (plain ints: checkpoints load with weights_only)."""
        return {"consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
