"""A diverging run stops at the first non-finite step and keeps its last good checkpoint; ``skip`` drops
such steps without touching weights or Adam's state; checkpoints with non-finite weights are never written.

The trigger is real: the default toy run (MLP, Adam) with ``model.optimizer.lr=1e6`` has a loss of
~1e15 at step 1 and NaN from step 2 on (deterministic on CPU with the fixed seed). The skip tests
inject NaN gradients at chosen steps with a callback (``on_after_backward``, before the guard looks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig, open_dict

from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import AtomicCheckpointIO, remove_partial_writes
from diffusionflow.lightning.finite_guard import FiniteGuard, NonFiniteError
from diffusionflow.train import train
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY_STEP = [
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.every_n_epochs=null",
]
EVENTS: list[dict[str, Any]] = []  # what InjectNaN saw, one entry per training step


@pytest.fixture
def train_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """The composed ``train`` config (fast settings) writing to ``tmp_path``."""
    yield lambda overrides=(): compose_train(list(overrides), tmp_path)
    GlobalHydra.instance().clear()


def _same(a: Any, b: Any) -> bool:
    """Nested dicts / lists / tensors equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class InjectNaN(Callback):
    """Puts a NaN in one gradient at the given global steps; records, per step, whether the weights and
    the optimizer state changed."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.before: tuple[dict, dict] | None = None

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict, dict]:
        weights = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}
        return weights, copy.deepcopy(trainer.optimizers[0].state_dict())

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.before = self._snapshot(trainer, pl_module)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step in self.steps:
            next(pl_module.backbone.parameters()).grad.view(-1)[0] = math.nan

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        assert self.before is not None
        weights, optimizer = self._snapshot(trainer, pl_module)
        EVENTS.append(
            {
                "step": trainer.global_step - 1,  # the step just taken (or skipped)
                "weights_same": _same(weights, self.before[0]),
                "optimizer_same": _same(optimizer, self.before[1]),
            }
        )


def _with_injection(cfg: DictConfig, steps: list[int]) -> DictConfig:
    EVENTS.clear()
    with open_dict(cfg):
        cfg.callbacks.inject = {"_target_": f"{__name__}.InjectNaN", "steps": steps}
    return cfg


def _finite(ckpt_path: Path) -> dict[str, Any]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        for name, value in ckpt[key].items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{key}[{name}]"
    return ckpt


def test_a_diverging_run_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(train_cfg, tmp_path):
    cfg = train_cfg(["model.optimizer.lr=1e6", "trainer.max_steps=8", *EVERY_STEP])
    with pytest.raises(NonFiniteError) as error:
        train(cfg)
    message = str(error.value)
    assert "non-finite loss (nan)" in message and "global step 2 (epoch 0)" in message, message
    assert "gradient of backbone." in message and "batch λ (log-SNR) in [" in message, message
    ckpt = _finite(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2  # the last step before the NaN, written before the failing one
    assert not (tmp_path / "samples.png").exists() and not (tmp_path / "metrics.json").exists()


def test_without_the_guard_a_non_finite_checkpoint_is_still_never_written(train_cfg, tmp_path):
    cfg = train_cfg(["model.optimizer.lr=1e6", "trainer.max_steps=8", "~callbacks.finite_guard", *EVERY_STEP])
    with pytest.raises(NonFiniteError, match="refusing to write checkpoint .*step_0000003.ckpt"):
        train(cfg)
    assert _finite(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_checkpoint_io_refuses_non_finite_weights_and_leaves_the_previous_file(tmp_path):
    io, last = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": torch.tensor(1)}, last)
    before = last.read_bytes()
    for key in ("state_dict", "current_model_state"):
        bad = {"state_dict": {"w": torch.ones(3)}, key: {"w": torch.ones(3), "b": torch.tensor([math.inf])}}
        with pytest.raises(NonFiniteError, match=rf"{key}\['b'\] hold NaN or infinite"):
            io.save_checkpoint(bad, last)
        assert last.read_bytes() == before
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3), "n": torch.tensor(-1)}}, last)
    assert torch.equal(torch.load(last, weights_only=True)["state_dict"]["w"], torch.zeros(3))


def test_a_write_cut_short_leaves_the_previous_file_and_its_temporary_is_removed_later(tmp_path, monkeypatch):
    """A save that dies half-way (here: ``torch.save`` raising after writing part of the file; a SIGKILL
    leaves the temporary behind as well) never touches ``last.ckpt``; the next run removes the leftover."""
    io, last = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, last)
    before = last.read_bytes()

    def dies_half_way(obj: Any, f: Any) -> None:
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, last)
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))
    killed = [last.parent / ".last.ckpt.x1.tmp", tmp_path / ".hpc_ckpt_1.ckpt.x2.tmp"]
    for path in killed:
        path.write_bytes(before[:10])
    assert remove_partial_writes(tmp_path) == sorted(killed)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["last.ckpt"]


def test_skip_policy_leaves_weights_and_adam_state_unchanged(train_cfg, tmp_path):
    cfg = train_cfg(["callbacks.finite_guard.policy=skip", "callbacks.finite_guard.max_skips=1"])
    train(_with_injection(cfg, steps=[2, 4]))
    assert [e["step"] for e in EVENTS] == list(range(6))
    for event in EVENTS:
        skipped = event["step"] in (2, 4)
        assert event["weights_same"] is skipped and event["optimizer_same"] is skipped, event
    _finite(tmp_path / "checkpoints" / "last.ckpt")
    assert (tmp_path / "metrics.json").exists()


def test_skip_policy_stops_after_max_skips_consecutive_steps(train_cfg, tmp_path):
    cfg = train_cfg(["callbacks.finite_guard.policy=skip", "callbacks.finite_guard.max_skips=2"])
    with pytest.raises(NonFiniteError, match=r"global step 3 .*after 2 consecutive skipped steps") as error:
        train(_with_injection(cfg, steps=[1, 2, 3]))
    assert "max_skips=2" in str(error.value) and "loss" not in str(error.value).split(" at ")[0]
    assert [e["weights_same"] for e in EVENTS] == [False, True, True]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"policy": "sometimes"}, "policy='sometimes'"), ({"max_skips": -1}, "max_skips=-1")],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FiniteGuard(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "ran"),
    [
        (["trainer.log_every_n_steps=4", "trainer.max_steps=12"], [0, 1, 2]),  # stopped at step 3's check
        (["trainer.log_every_n_steps=25", "trainer.max_steps=4"], [0, 1, 2, 3]),  # at the end, before saving
    ],
)
def test_stop_policy_stops_at_the_next_check_naming_the_first_non_finite_step(
    train_cfg, tmp_path, overrides, ran
):
    """``stop`` looks at the device only on logging steps, before a checkpoint is saved and at an epoch's end:
    a NaN gradient at step 1 stops the run there, named with its step and parameters, and no checkpoint,
    sample or metric of the run is written."""
    cfg = _with_injection(train_cfg(overrides), steps=[1])
    with pytest.raises(NonFiniteError) as error:
        train(cfg)
    message = str(error.value)
    assert "non-finite gradient of backbone." in message and "global step 1 (epoch 0)" in message, message
    assert "batch λ (log-SNR) in [" in message and "loss" not in message.split(" at ")[0], message
    assert [e["step"] for e in EVENTS] == ran
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "samples.png").exists()
