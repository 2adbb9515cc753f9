"""Declarative checks of config values, applied by the entry points before any work starts.

A table maps a dotted key (``*`` matches any name of one level, as in ``callbacks.*.*every_n_*``) to a
:class:`Rule`: the type and range a value must have. :func:`check_config` checks every key of a table
that the config holds and raises one :class:`~diffusionflow.errors.ConfigError` listing each bad value
as ``trainer.max_steps='abc': expected an integer >= -1``. Command-line values arrive as OmegaConf
parsed them (``abc`` a string, ``3.5`` a float, ``1e5`` the float 100000.0): an integer key rejects
strings, bools and non-integral floats, and takes an integral float (``trainer.max_steps=1e5``) as the
integer it is, written back into the config. A number key takes integers and finite floats.

Keys a config does not hold are skipped (``trainer.num_nodes``, the callbacks of ``callbacks=none``);
the first table entry that matches a key decides it, so a specific entry goes before a pattern.
"""

from __future__ import annotations

import fnmatch
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.connector import _PRECISION_INPUT
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from diffusionflow.errors import ConfigError

__all__ = [
    "SAMPLE",
    "TRAIN",
    "AnyOf",
    "Int",
    "IntList",
    "Number",
    "OneOf",
    "Rule",
    "check_config",
    "check_device",
    "show",
]


def show(value: Any) -> str:
    """A value as a message shows it: strings quoted, None as ``null``, config nodes as plain data."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    return "null" if value is None else repr(value)


def _bound(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


class Rule:
    """What a value must be: :meth:`accept` gives the value to keep (an integral float as an int) or
    raises ``ValueError``; :attr:`expected` says what is allowed, for the message."""

    expected: str

    def accept(self, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class _Ranged(Rule):
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    null: bool = False

    noun = "a number"

    @property
    def expected(self) -> str:
        low, high = (
            (self.gt if self.gt is not None else self.ge),
            (self.lt if self.lt is not None else self.le),
        )
        text = self.noun + _bound(low, high, self.gt is not None, self.lt is not None)
        return text + (" or null" if self.null else "")

    def _in_range(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )


@dataclass(frozen=True)
class Int(_Ranged):
    """An integer in the range (bools and non-integral floats rejected; ``4.0`` kept as ``4``)."""

    noun = "an integer"

    def accept(self, value: Any) -> Any:
        if value is None and self.null:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not self._in_range(value):
            raise ValueError(self.expected)
        return value


@dataclass(frozen=True)
class Number(_Ranged):
    """A finite int or float in the range (bools rejected)."""

    noun = "a number"

    def accept(self, value: Any) -> Any:
        if value is None and self.null:
            return None
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not self._in_range(value)
        ):
            raise ValueError(self.expected)
        return value


@dataclass(frozen=True)
class OneOf(Rule):
    """One of ``values`` (compared with their type: ``True`` is not ``1``)."""

    values: tuple[Any, ...]

    @property
    def expected(self) -> str:
        return f"one of {list(self.values)}"

    def accept(self, value: Any) -> Any:
        if not any(type(value) is type(v) and value == v for v in self.values):
            raise ValueError(self.expected)
        return value


@dataclass(frozen=True)
class IntList(Rule):
    """A non-empty list of distinct integers >= ``ge`` (e.g. device indices)."""

    ge: int = 0
    what: str = "integers"

    @property
    def expected(self) -> str:
        return f"a list of distinct {self.what} >= {self.ge}"

    def accept(self, value: Any) -> Any:
        items = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        if (
            not isinstance(items, list)
            or not items
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= self.ge for i in items)
            or len(set(items)) != len(items)
        ):
            raise ValueError(self.expected)
        return value


@dataclass(frozen=True)
class AnyOf(Rule):
    """The first of ``rules`` that accepts the value."""

    rules: tuple[Rule, ...]

    @property
    def expected(self) -> str:
        return ", ".join(r.expected for r in self.rules[:-1]) + " or " + self.rules[-1].expected

    def accept(self, value: Any) -> Any:
        for rule in self.rules:
            try:
                return rule.accept(value)
            except ValueError:
                continue
        raise ValueError(self.expected)


PRECISIONS: tuple[Any, ...] = tuple(
    v for arg in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(arg)
)
"""Lightning's ``Trainer(precision=...)`` values: ``"32-true"``, ``"bf16-mixed"``, … and the aliases
``32``, ``"32"``, ``"bf16"``, …"""

SAMPLER: dict[str, Rule] = {"sampler.steps": Int(ge=1)}

TRAIN: dict[str, Rule] = {
    "seed": Int(ge=0, null=True),
    "trainer.max_steps": Int(ge=-1),
    "trainer.max_epochs": Int(ge=-1, null=True),
    "trainer.devices": AnyOf((Int(ge=1), OneOf(("auto", -1)), IntList(ge=0, what="device indices"))),
    "trainer.num_nodes": Int(ge=1),
    "trainer.log_every_n_steps": Int(ge=1),
    "trainer.check_val_every_n_epoch": Int(ge=1, null=True),
    "trainer.precision": OneOf(PRECISIONS),
    "trainer.gradient_clip_val": Number(gt=0, null=True),
    "data.batch_size": Int(ge=1),
    "data.num_workers": Int(ge=0),
    "data.num_classes": Int(ge=0),
    **SAMPLER,
    "model.optimizer.lr": Number(ge=0),  # 0 freezes the weights (tests of evaluation use it)
    "model.guidance": Number(),
    "model.label_dropout": Number(ge=0, lt=1),
    # augment=edm (data/augment.py); its label count against backbone.augment_dim: DiffusionModule
    "model.augment.p": Number(ge=0, le=1),
    "model.augment.rotate_frac_max": Number(ge=0, le=1),
    "model.augment.aniso_rotate_prob": Number(ge=0, le=1),
    "model.augment.*_std": Number(ge=0),
    "model.augment.[xy]flip": Number(ge=0),
    "model.augment.scale": Number(ge=0),
    "model.augment.rotate_frac": Number(ge=0),
    "model.augment.aniso": Number(ge=0),
    "model.augment.translate_frac": Number(ge=0),
    "backbone.augment_dim": Int(ge=0),
    # Lightning's ModelCheckpoint takes 0 (never); the others count steps or epochs between events
    "callbacks.model_checkpoint.every_n_*": Int(ge=0, null=True),
    "callbacks.*.*every_n_*": Int(ge=1, null=True),
    "callbacks.*.num_samples": Int(ge=1),
    "callbacks.*.batch_size": Int(ge=1),
    "callbacks.ema.half_life_images": Number(gt=0, null=True),
    "callbacks.ema.decay": Number(ge=0, lt=1, null=True),
}
"""``diffusionflow.train``'s keys (``conf/train.yaml`` and its groups)."""

SAMPLE: dict[str, Rule] = {
    "num_samples": Int(ge=1),
    "batch_size": Int(ge=1),
    "seed": Int(ge=0),
    **SAMPLER,
    "guidance": Number(null=True),
    "format": OneOf(("npz", "png", "both")),
}
"""``diffusionflow.sample``'s keys (``conf/sample.yaml``)."""


def _keys(cfg: Any, parts: list[str], prefix: str = "") -> list[str]:
    """The dotted keys of ``cfg`` that match ``parts`` (one pattern per level), in config order."""
    if not parts or not isinstance(cfg, DictConfig):
        return []
    head, rest = parts[0], parts[1:]
    names = [str(k) for k in cfg if fnmatch.fnmatchcase(str(k), head)]
    keys = []
    for name in names:
        key = f"{prefix}{name}"
        if not rest:
            keys.append(key)
            continue
        try:
            child = cfg[name]
        except OmegaConfBaseException:  # an interpolation that does not resolve: not a group to walk
            continue
        keys += _keys(child, rest, key + ".")
    return keys


def check_config(cfg: DictConfig, table: Mapping[str, Rule]) -> None:
    """Checks every key of ``table`` that ``cfg`` holds; a ``ConfigError`` lists every bad value, each
    as ``key=value: expected ...``. Integral floats of integer keys are written back as ints."""
    errors, decided = [], set()
    for pattern, rule in table.items():
        for key in _keys(cfg, pattern.split(".")):
            if key in decided:
                continue
            decided.add(key)
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=True, throw_on_resolution_failure=True)
            except MissingMandatoryValue:
                errors.append(f"{key}=???: no value given; expected {rule.expected}")
                continue
            except OmegaConfBaseException as err:  # an interpolation that does not resolve
                reason = str(err).splitlines()[0]
                errors.append(f"{key}: {type(err).__name__}: {reason}; expected {rule.expected}")
                continue
            try:
                kept = rule.accept(value)
            except ValueError:
                errors.append(f"{key}={show(value)}: expected {rule.expected}")
                continue
            if type(kept) is not type(value):
                with read_write(cfg):
                    OmegaConf.update(cfg, key, kept, merge=False)
    if errors:
        raise ConfigError("; ".join(errors))


def check_device(name: str | None, key: str = "device") -> torch.device:
    """The torch device ``name`` (None: cuda when available, else cpu), checked against this machine
    before anything is loaded onto it: an unknown name, or a CUDA / MPS device that is not here, is a
    ``ConfigError`` naming ``key``, the value and the devices there are."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = ", ".join(["cpu", *(["cuda"] if count else []), *(f"cuda:{i}" for i in range(count))])
    mps = torch.backends.mps.is_available()
    allowed += ", mps" if mps else ""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"{key}={show(name)}: not a device ({err}); allowed: {allowed}") from err
    if device.type == "cuda" and not count:
        raise ConfigError(f"{key}={name}: no CUDA device is available; allowed: {allowed}")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ConfigError(
            f"{key}={name}: this machine has {count} CUDA device{'s' if count > 1 else ''}; "
            f"allowed: {allowed}"
        )
    if device.type == "mps" and not mps:
        raise ConfigError(f"{key}={name}: no MPS device is available; allowed: {allowed}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}={name}: {device.type} devices are not supported; allowed: {allowed}")
    return device
