"""The unified core: pure torch, no Lightning, Hydra, W&B or torchvision.

One convention: t ∈ [0, 1], t = 0 data, t = 1 noise, z_t = α_t x + σ_t ε, λ = log(α²/σ²).
"""

from . import (
    adapters,
    likelihood,
    objective,
    oracle,
    predictions,
    proposals,
    samplers,
    schedules,
    sde,
    straightness,
    weightings,
)

__all__ = [
    "adapters",
    "likelihood",
    "objective",
    "oracle",
    "predictions",
    "proposals",
    "samplers",
    "schedules",
    "sde",
    "straightness",
    "weightings",
]
