"""Every config value is checked, types included, before any work: ``diffusionflow.checks`` and
``train.validate``. A bad value stops the run with a ``ConfigError`` naming the key, the value and what
is allowed, before a checkpoint or a log is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusionflow.checks import TRAIN, AnyOf, Int, Number, OneOf, check_config, check_device
from diffusionflow.config import ConfigError
from diffusionflow.train import train, validate


def _nothing_written(out: Path) -> None:
    for name in ("checkpoints", "csv", "metrics.json", "config_resolved.yaml", "samples.npz"):
        assert not (out / name).exists(), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc': expected an integer >= -1"),
        ("seed=abc", "seed='abc': expected an integer >= 0 or null"),
        ("data.batch_size=3.5", "data.batch_size=3.5: expected an integer >= 1"),
        ("sampler.steps=1.5", "sampler.steps=1.5: expected an integer >= 1"),
    ],
)
def test_the_issues_examples_stop_before_any_work(train_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        train(train_cfg([override]))
    assert str(err.value) == message
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=true", "seed=True: expected an integer >= 0 or null"),  # a bool is not an integer
        ("trainer.max_steps=-5", "trainer.max_steps=-5: expected an integer >= -1"),
        ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5: expected an integer >= -1 or null"),
        ("trainer.devices=0", "trainer.devices=0: expected an integer >= 1, one of ['auto', -1] or a list"),
        ("++trainer.num_nodes=0", "trainer.num_nodes=0: expected an integer >= 1"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: expected an integer >= 1"),
        ("trainer.precision=31", "trainer.precision=31: expected one of [64, 32, 16, 'transformer-engine'"),
        ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val=0: expected a number > 0 or null"),
        ("data.num_workers=-1", "data.num_workers=-1: expected an integer >= 0"),
        ("model.optimizer.lr=abc", "model.optimizer.lr='abc': expected a number >= 0"),
        ("model.guidance=abc", "model.guidance='abc': expected a number"),
        ("model.guidance=nan", "model.guidance=nan: expected a number"),
        ("model.label_dropout=1", "model.label_dropout=1: expected a number in [0, 1)"),
        (
            "callbacks.final_eval.every_n_steps=0",
            "callbacks.final_eval.every_n_steps=0: expected an integer >= 1 or null",
        ),
        (
            "callbacks.ema.update_every_n_steps=x",
            "callbacks.ema.update_every_n_steps='x': expected an integer >= 1",
        ),
        (
            "callbacks.model_checkpoint.every_n_epochs=-1",
            "callbacks.model_checkpoint.every_n_epochs=-1: expected an integer >= 0 or null",
        ),
        (
            "callbacks.final_eval.num_samples=0",
            "callbacks.final_eval.num_samples=0: expected an integer >= 1",
        ),
        (
            "callbacks.ema.half_life_images=-1",
            "callbacks.ema.half_life_images=-1: expected a number > 0 or null",
        ),
    ],
)
def test_more_bad_values_name_key_value_and_what_is_allowed(train_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        validate(train_cfg([override]))
    assert str(err.value).startswith(message)
    _nothing_written(tmp_path)


def test_every_bad_value_is_listed_at_once(train_cfg):
    with pytest.raises(ConfigError) as err:
        validate(train_cfg(["seed=-1", "data.batch_size=0", "sampler.steps=x"]))
    assert str(err.value) == (
        "seed=-1: expected an integer >= 0 or null; data.batch_size=0: expected an integer >= 1; "
        "sampler.steps='x': expected an integer >= 1"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=null", "trainer.max_epochs=null", "trainer.gradient_clip_val=1.0"],
        ["trainer.devices=auto", "trainer.precision=bf16-mixed"],
        ["trainer.devices=[0,1]", "trainer.precision=32"],  # Lightning's int alias
        ["callbacks.model_checkpoint.every_n_epochs=0"],  # 0: ModelCheckpoint saves no top-k checkpoint
        ["callbacks=none"],  # no callbacks: nothing of callbacks.* to check
        ["experiment=digits_unet"],  # label dropout and guidance on labelled data
    ],
)
def test_good_values_pass(train_cfg, overrides):
    validate(train_cfg(overrides))


def test_an_integral_float_is_taken_as_the_integer(train_cfg):
    """``trainer.max_steps=1e3`` is OmegaConf's float 1000.0: kept, as the int Lightning needs."""
    cfg = train_cfg(["trainer.max_steps=1e3", "data.batch_size=64.0"])
    validate(cfg)
    assert (cfg.trainer.max_steps, cfg.data.batch_size) == (1000, 64)
    assert type(cfg.trainer.max_steps) is int and type(cfg.data.batch_size) is int


def test_cross_group_checks_still_apply(train_cfg):
    with pytest.raises(ConfigError, match="model.label_dropout=0.1 needs labelled data"):
        validate(train_cfg(["model.label_dropout=0.1"]))


def test_patterns_and_precedence():
    """``*`` matches one level; the first entry matching a key decides it; absent keys are skipped."""
    table = {
        "a.keep.every_n_x": Int(ge=0),
        "a.*.every_n_*": Int(ge=1, null=True),
        "b": AnyOf((Number(gt=0), OneOf(("auto",)))),
        "missing.key": Int(),
    }
    good = OmegaConf.create({"a": {"keep": {"every_n_x": 0}, "other": {"every_n_y": None}}, "b": "auto"})
    check_config(good, table)
    bad = OmegaConf.create({"a": {"keep": {"every_n_x": 0}, "other": {"every_n_y": 0}, "c": 3}, "b": "x"})
    with pytest.raises(ConfigError) as err:
        check_config(bad, table)
    assert str(err.value) == (
        "a.other.every_n_y=0: expected an integer >= 1 or null; "
        "b='x': expected a number > 0 or one of ['auto']"
    )


def test_a_missing_value_is_named():
    with pytest.raises(ConfigError) as err:
        check_config(OmegaConf.create({"data": {"batch_size": "???", "num_workers": "${nowhere}"}}), TRAIN)
    assert str(err.value) == (
        "data.batch_size=???: no value given; expected an integer >= 1; data.num_workers: "
        "InterpolationKeyError: Interpolation key 'nowhere' not found; expected an integer >= 0"
    )


def test_devices_are_checked_against_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("cpu") == torch.device("cpu") and check_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device=cuda: no CUDA device is available; allowed: cpu"):
        check_device("cuda")
    with pytest.raises(ConfigError, match=r"^--device='gpu0': not a device .*; allowed: cpu"):
        check_device("gpu0", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ConfigError, match=r"device=cuda:3: this machine has 2 CUDA devices; allowed: cpu, cuda"
    ):
        check_device("cuda:3")
