"""From a composed Hydra config to core objects, with every value checked before any work starts.

One construction path: :func:`resolve` replaces each ``canonical`` node (``schedule``, ``prediction``,
``proposal``: the setup of the weighting's paper, ``core.components.canonical``) by the concrete
``_target_`` node it stands for, so the resolved config is what runs, what is printed and what a
checkpoint stores; :func:`build_components` then builds every component from its node the same way,
``core.components.component`` supplying what a class ``needs`` (the weighting, the schedule).
Errors are ``ConfigError``s naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from diffusionflow.core.components import CANONICAL, KINDS, REGISTRIES, Components, canonical, component
from diffusionflow.core.predictions import Prediction
from diffusionflow.core.samplers import Sampler
from diffusionflow.core.schedules import Schedule
from diffusionflow.errors import ConfigError

__all__ = ["Components", "ConfigError", "build_components", "instantiate_checked", "resolve"]

MIN_ALPHA_EPS = 1e-3
"""ε-prediction gives x̂ = (z − σ ε̂)/α: below this α at the first sampling step it amplifies the
network's error by > 1000 (and is undefined at α = 0)."""


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def instantiate_checked(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose errors become ``ConfigError``s naming the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = _root_cause(err)
        target = OmegaConf.select(node, "_target_") if isinstance(node, DictConfig) else None
        raise ConfigError(f"{key} ({target}): {cause}") from cause
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _target(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_of(node: DictConfig, kind: str) -> type:
    """The registered class a node's ``_target_`` names."""
    target = node.get("_target_")
    allowed = sorted(_target(c) for c in REGISTRIES[kind].values())
    try:
        cls = get_class(str(target))
    except Exception as err:
        raise ConfigError(f"{kind}._target_={target}: not importable ({err}); allowed: {allowed}") from err
    if cls not in REGISTRIES[kind].values():
        raise ConfigError(f"{kind}._target_={target} is not a {kind}; allowed: {allowed}")
    return cls


def _options(node: DictConfig) -> dict[str, Any]:
    return {
        k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in ("name", "_target_")
    }


def resolve(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` in which every ``canonical`` component node is the concrete node of the
    weighting's paper (``_target_`` and its options; options set beside ``name: canonical`` override
    the paper's). Resolving a resolved config changes nothing."""
    out = cfg.copy()
    weighting = build_node("weighting", cfg.weighting, {})
    for kind in ("schedule", "prediction", "proposal"):
        node = cfg[kind]
        if node.get("name") == CANONICAL:
            cls, options = canonical(weighting, kind)
            out[kind] = OmegaConf.create({"_target_": _target(cls), **options, **_options(node)})
    return out


def build_node(kind: str, node: DictConfig, provided: dict[str, Any]) -> Any:
    """The ``kind`` component of a concrete node, with what its class ``needs`` from ``provided``."""
    if node.get("name") == CANONICAL:
        raise ConfigError(f"{kind}={CANONICAL} reached the builder unresolved: call config.resolve first")
    cls = _class_of(node, kind)
    try:
        return component(kind, cls, provided, **_options(node))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{kind} ({_target(cls)}): {err}") from err


def build_components(cfg: DictConfig) -> Components:
    """Weighting, schedule, prediction, proposal and sampler of a run config (resolved here if it is not
    yet), built in that order and cross-checked."""
    cfg = resolve(cfg)
    built: dict[str, Any] = {}
    for kind in KINDS:
        built[kind] = build_node(kind, cfg[kind], built)
    _check_eps_at_first_step(built["prediction"], built["schedule"], built["sampler"])
    return Components(**built)


def _check_eps_at_first_step(prediction: Prediction, schedule: Schedule, sampler: Sampler) -> None:
    if prediction.name != "eps":
        return
    t0 = sampler.times(schedule)[0]
    alpha0 = float(schedule.alpha(t0))
    if alpha0 < MIN_ALPHA_EPS:
        raise ConfigError(
            f"prediction=eps cannot give x̂ = (z − σ ε̂)/α where α ≈ 0, and sampler.grid={sampler.grid} starts "
            f"at t={float(t0):.3g} where schedule {schedule.name} has α={alpha0:.3g} (< {MIN_ALPHA_EPS}). "
            f"Allowed: sampler.grid=edm or uniform_logsnr (start at σ̃ ≤ 80), sampler.t_max < 1, "
            f"a schedule.logsnr_min > {-2 * math.log(1 / MIN_ALPHA_EPS):.1f}, or prediction v, flow, x or edm"
        )
