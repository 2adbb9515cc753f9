"""The five components of a run, and the one rule that builds each of them.

A run is a weighting w(λ), a schedule (α_t, σ_t), a prediction (what the network outputs), a proposal
p(λ) (the training noise levels) and a sampler. They are built in that order (``KINDS``); a class
names in ``needs`` the components built before it that it takes as arguments (p ∝ w needs the
weighting, uniform-t without a schedule of its own takes the run's), and :func:`component` supplies
them. ``canonical`` stands for the setup of the weighting's paper (``Weighting.canonical()``) and is
resolved by :func:`canonical` alone. In ten lines, from a notebook::

    w = component("weighting", "edm")
    run = {"weighting": w}
    for kind in ("schedule", "prediction", "proposal"):
        run[kind] = component(kind, "canonical", run)
    run["sampler"] = component("sampler", "heun", run, steps=18)
    parts = Components(**run)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .predictions import PREDICTIONS, Prediction
from .proposals import PROPOSALS, Proposal
from .registry import Registry
from .samplers import SAMPLERS, Sampler
from .schedules import SCHEDULES, Schedule
from .weightings import WEIGHTINGS, Weighting

__all__ = ["CANONICAL", "KINDS", "REGISTRIES", "Components", "canonical", "component"]

CANONICAL = "canonical"
KINDS = ("weighting", "schedule", "prediction", "proposal", "sampler")
REGISTRIES: dict[str, Registry[Any]] = {
    "weighting": WEIGHTINGS,
    "schedule": SCHEDULES,
    "prediction": PREDICTIONS,
    "proposal": PROPOSALS,
    "sampler": SAMPLERS,
}
CANONICAL_KINDS = ("schedule", "prediction", "proposal")


@dataclass(frozen=True)
class Components:
    weighting: Weighting
    schedule: Schedule
    prediction: Prediction
    proposal: Proposal
    sampler: Sampler


def canonical(weighting: Weighting, kind: str) -> tuple[type, dict[str, Any]]:
    """The class and options of ``kind`` (schedule, prediction or proposal) in the weighting's paper."""
    if kind not in CANONICAL_KINDS:
        raise ValueError(f"{kind}={CANONICAL} is not defined; a weighting fixes {list(CANONICAL_KINDS)}")
    setup = weighting.canonical()
    options = {"schedule": {}, "prediction": setup.prediction_kwargs, "proposal": setup.proposal_kwargs}
    return REGISTRIES[kind][getattr(setup, kind)], dict(options[kind])


def component(kind: str, spec: str | type, provided: Mapping[str, Any] | None = None, **options: Any) -> Any:
    """The ``kind`` component ``spec``: a registered name, ``canonical`` (needs ``provided["weighting"]``)
    or a class, built with ``options`` and with each component the class ``needs`` taken from
    ``provided`` where ``options`` leaves it unset (None); without it in ``provided`` the class's own
    default applies (uniform-t: the cosine schedule) or its constructor names what is missing."""
    provided = provided or {}
    if spec == CANONICAL:
        if "weighting" not in provided:
            raise ValueError(f"{kind}={CANONICAL} needs the run's weighting")
        cls, defaults = canonical(provided["weighting"], kind)
        options = {**defaults, **options}
    else:
        cls = REGISTRIES[kind][spec] if isinstance(spec, str) else spec
    for need in getattr(cls, "needs", ()):
        if options.get(need) is None and need in provided:
            options[need] = provided[need]
        elif options.get(need) is None:
            options.pop(need, None)
    return cls(**options)
