"""From a composed Hydra config to core objects, with every value checked before any work starts.

``weighting=X`` alone gives X's canonical setup (its paper's schedule, prediction and proposal): the
groups ``schedule``, ``prediction`` and ``proposal`` default to ``canonical`` and are resolved here
from ``Weighting.canonical()``. Any of them can still be set to test the framework's invariances.
Errors are ``ConfigError``s naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusionflow.core import predictions, proposals, schedules
from diffusionflow.core.predictions import Prediction
from diffusionflow.core.proposals import Proposal
from diffusionflow.core.samplers import Sampler
from diffusionflow.core.schedules import Schedule
from diffusionflow.core.weightings import Weighting

__all__ = ["Components", "ConfigError", "build_components", "instantiate_checked"]

CANONICAL = "canonical"
MIN_ALPHA_EPS = 1e-3
"""ε-prediction gives x̂ = (z − σ ε̂)/α: below this α at the first sampling step it amplifies the
network's error by > 1000 (and is undefined at α = 0)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class Components:
    schedule: Schedule
    prediction: Prediction
    weighting: Weighting
    proposal: Proposal
    sampler: Sampler


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


def _is_canonical(node: Any) -> bool:
    return isinstance(node, DictConfig) and node.get("name") == CANONICAL


def _options(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}


def build_components(cfg: DictConfig) -> Components:
    """Schedule, prediction, weighting, proposal and sampler of a run config, cross-checked."""
    weighting: Weighting = instantiate_checked(cfg.weighting, "weighting")
    canon = weighting.canonical()
    try:
        if _is_canonical(cfg.schedule):
            schedule = schedules.build(canon.schedule, **_options(cfg.schedule))
        else:
            schedule = instantiate_checked(cfg.schedule, "schedule")
        if _is_canonical(cfg.prediction):
            prediction = predictions.build(
                canon.prediction, **{**canon.prediction_kwargs, **_options(cfg.prediction)}
            )
        else:
            prediction = instantiate_checked(cfg.prediction, "prediction")
        if _is_canonical(cfg.proposal):
            proposal = proposals.build(CANONICAL, weighting=weighting, **_options(cfg.proposal))
        else:
            extra: dict[str, Any] = {}
            target = str(cfg.proposal.get("_target_", ""))
            if target.endswith(("Adaptive", "WeightingProposal")):
                extra["weighting"] = weighting
            if target.endswith("UniformT") and cfg.proposal.get("schedule") is None:
                extra["schedule"] = schedule
            proposal = instantiate_checked(cfg.proposal, "proposal", **extra)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err
    sampler: Sampler = instantiate_checked(cfg.sampler, "sampler")
    _check_eps_at_first_step(prediction, schedule, sampler)
    return Components(schedule, prediction, weighting, proposal, sampler)


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
