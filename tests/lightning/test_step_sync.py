"""No host-device synchronisation on the training steps whose metrics are not written.

On a GPU every ``.item()``, ``.cpu()``, ``.tolist()``, ``float(t)`` or ``if t:`` waits for the device's
queue. On this CPU-only machine they cost nothing, so the test counts them instead: a default ``train``
run (EMA, finite guard, throughput, checkpoints, CSV logger, plus post-hoc EMA) with every such Tensor
method wrapped, attributing each call to the training step it happens in (from the first callback's
``on_train_batch_start`` to the module's ``on_train_batch_end``, the last hook of a step). Only
The progress bar is off: it converts its values to numbers at every refresh, so the module and the
throughput callback give it host copies, made on logging steps (not visible on a CPU). Only
Python-level conversions are seen (not, e.g., a boolean-mask index inside an operator); on a GPU,
``torch.cuda.set_sync_debug_mode("error")`` is the complete check. Reads of tensors that live on the host
in a GPU run too are not counted (``HOST_SIDE``).
"""

from __future__ import annotations

import traceback
from typing import Any, ClassVar

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import OmegaConf, open_dict

from diffusionflow.lightning.internals import logs_this_step
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.train import train
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
LOG_EVERY, STEPS = 4, 11
HOST_SIDE = {
    ("diffusionflow/core/proposals.py", "sample"): "λ is drawn on the host (a CPU generator)",
    ("torch/optim/optimizer.py", "_get_value"): "Adam's step count is a CPU tensor (not capturable/fused)",
}


class Step:
    """The training step now running (None between steps) and whether it writes its metrics."""

    step: int | None = None
    logging = False
    calls: ClassVar[list[tuple[int, bool, str, str]]] = []


class OpenStep(Callback):
    """First in the callbacks: marks the start of a step."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        Step.step, Step.logging = trainer.global_step, logs_this_step(trainer)


def _close_step(self: LightningModule, *args: Any) -> None:  # the module's hook runs after every callback's
    Step.step = None


def _counted(name: str, original: Any) -> Any:
    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        stack = traceback.extract_stack()[:-1] if Step.step is not None else []
        if stack and not any(
            f.filename.endswith(path) and f.name == fn for f in stack for path, fn in HOST_SIDE
        ):
            where = f"{stack[-1].filename.split('site-packages/')[-1]}:{stack[-1].lineno}"
            Step.calls.append((Step.step, Step.logging, name, where))
        return original(self, *args, **kwargs)

    return counted


def test_non_logging_steps_read_nothing_from_the_device(tmp_path, monkeypatch):
    cfg = compose_train(
        [
            f"trainer.max_steps={STEPS}",
            f"trainer.log_every_n_steps={LOG_EVERY}",
            "+callbacks@callbacks.posthoc_ema=posthoc_ema",
            "callbacks.posthoc_ema.snapshot_every_n_steps=null",
        ],
        tmp_path,
    )
    GlobalHydra.instance().clear()
    with open_dict(cfg):  # OpenStep first, before every other callback
        callbacks = OmegaConf.to_container(cfg.callbacks)
        cfg.callbacks = {"open_step": {"_target_": f"{__name__}.OpenStep"}, **callbacks}
    Step.calls = []
    monkeypatch.setattr(DiffusionModule, "on_train_batch_end", _close_step, raising=False)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, _counted(name, getattr(torch.Tensor, name)))
    train(cfg)
    monkeypatch.undo()
    steps = {step for step, *_ in Step.calls}
    quiet = [call for call in Step.calls if not call[1]]
    assert not quiet, "host reads on non-logging steps:\n" + "\n".join(map(str, quiet))
    logging_steps = {s for s in range(STEPS) if (s + 1) % LOG_EVERY == 0}
    assert steps == logging_steps  # the counting sees the reads of the logging steps: it has teeth
