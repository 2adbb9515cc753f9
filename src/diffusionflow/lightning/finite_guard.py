"""Stop (or skip) a training step whose loss or gradients are not finite.

A diverging run (``model.optimizer.lr=1e6``) used to train to ``max_steps`` on NaN, overwrite
``last.ckpt`` with NaN weights and write NaN samples and metrics. :class:`FiniteGuard` looks at the
step's loss and gradients just before the optimizer step (``on_before_optimizer_step``, after the
backward pass and before gradient clipping and the step itself), so the weights it protects are still
those of the last good step:

* ``policy="stop"`` raises :class:`NonFiniteError` naming the step, what was not finite (the loss, the
  gradients of which parameters) and the log-SNR (λ) range of the batch. Nothing after it runs: no
  checkpoint, no final evaluation, no ``metrics.json``.
* ``policy="skip"`` drops the gradients (every one set to ``None``), so the optimizer step changes
  neither the weights nor the optimizer state (Adam's moments and step count); ``max_skips``
  consecutive skips are allowed, one more raises :class:`NonFiniteError`. The skipped step still
  counts as a step (``global_step``, the learning-rate schedule and the training noise move on), and
  what ``training_step`` did before the check stays done: its NaN loss is in the logged loss and the
  λ-bin statistics of that step.

With 16-bit mixed precision (a gradient scaler) infinite gradients are the scaler's business (it skips
the step and lowers the scale), so only the loss is checked. Under DDP every rank takes the same
decision (any rank's non-finite loss counts for all). The check costs one host-device
synchronisation per step.

The module's ``training_step`` leaves the loss in ``last_loss`` and the batch's λ in ``last_logsnr``
(``DiffusionModule`` does); a module without them is checked on its gradients only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffusionflow.errors import ConfigError

__all__ = ["POLICIES", "FiniteGuard", "NonFiniteError"]

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
SHOWN_PARAMETERS = 3


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


class FiniteGuard(Callback):
    """Checks the loss and the gradients of every optimizer step; ``policy`` ``stop`` or ``skip``.

    Args:
        policy: ``stop`` raises :class:`NonFiniteError` at the first non-finite step; ``skip`` drops
            that step's gradients (no weight or optimizer-state change).
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

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad.detach() for p in params if p.grad is not None]
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        loss = getattr(pl_module, "last_loss", None)
        flags = [torch.isfinite(loss.detach()).all()] if isinstance(loss, Tensor) else []
        if check_grads and grads:
            # The ∞-norm (max |g|) is NaN or ∞ exactly when g holds a NaN or an ∞, and cannot overflow.
            flags.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))
        bad = bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive_skips = 0
            return
        what = self._describe(pl_module, loss, params if check_grads else [])
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.policy == "skip" and self.consecutive_skips < self.max_skips:
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
        stopped = (
            f" after {self.consecutive_skips} consecutive skipped steps (callbacks.finite_guard.max_skips="
            f"{self.max_skips})"
            if self.policy == "skip"
            else ""
        )
        raise NonFiniteError(
            f"non-finite {what} at {where}, {_logsnr_range(pl_module)}: training stopped{stopped}; "
            "the weights and checkpoints are those of the last finite step. Lower model.optimizer.lr, "
            "set trainer.gradient_clip_val, or set callbacks.finite_guard.policy=skip"
        )

    @staticmethod
    def _describe(pl_module: LightningModule, loss: Any, params: list[Tensor]) -> str:
        """``loss (nan)`` and/or ``gradient of a.weight, b.bias (and 3 more)``."""
        parts = []
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            parts.append(f"loss ({loss.detach().double().mean().item()})")
        names = _parameter_names(pl_module)
        bad = [
            names.get(id(p), "<unnamed>")
            for p in params
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        if bad:
            more = f" (and {len(bad) - SHOWN_PARAMETERS} more)" if len(bad) > SHOWN_PARAMETERS else ""
            parts.append(f"gradient of {', '.join(bad[:SHOWN_PARAMETERS])}{more}")
        return " and ".join(parts) or "loss or gradient on another rank"

    def state_dict(self) -> dict[str, Any]:
        """The running count of consecutive skips (plain ints: checkpoints load with weights_only)."""
        return {"consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
