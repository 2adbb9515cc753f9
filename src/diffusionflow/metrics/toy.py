"""Two-sample distances in data space, for 2-D toy data (no network, no feature extractor).

* Energy distance (Székely & Rizzo 2013): E‖X − Y‖ − ½E‖X − X'‖ − ½E‖Y − Y'‖ ≥ 0, zero iff the laws
  are equal; reported as 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (the V-statistic, as in scipy's 1-D version).
* Sliced Wasserstein-2 (Rabin et al. 2011; Bonneel et al. 2015): √(E_θ W₂²(θᵀX, θᵀY)) over random
  unit directions θ, with the 1-D W₂ between equal-size samples from sorted projections.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_distance", "sliced_wasserstein"]


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ over all pairs (the V-statistic), in float64."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """√ of the mean squared 1-D W₂ over ``projections`` random directions (fixed by ``seed``)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    n = min(len(x), len(y))
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (x[:n].cpu() @ theta).sort(0).values
    py = (y[:n].cpu() @ theta).sort(0).values
    return float((px - py).pow(2).mean().sqrt())
