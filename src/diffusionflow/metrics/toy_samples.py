"""Generated 2-D samples scored against their law: distances to fresh reference samples, the same
distances between two reference sets (the noise floor at this sample size), and, for Gaussian mixtures,
exact log-densities."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .toy import energy_distance, sliced_wasserstein

__all__ = ["toy_metrics"]


def toy_metrics(samples: Tensor, dataset: Any, n: int, seed: int) -> dict[str, float]:
    """Distances of ``samples`` to ``n`` reference samples of ``dataset`` (seed ``seed + 1``) and their
    floor (against a second set, seed ``seed + 2``); exact mean log-densities for mixtures."""
    ref = dataset.reference_samples(n, seed=seed + 1).double()
    ref2 = dataset.reference_samples(n, seed=seed + 2).double()
    samples = samples.double()
    out = {
        "energy_distance": energy_distance(samples, ref),
        "sliced_w2": sliced_wasserstein(samples, ref),
        "energy_distance_floor": energy_distance(ref2, ref),
        "sliced_w2_floor": sliced_wasserstein(ref2, ref),
    }
    if getattr(dataset, "mixture", None) is not None:
        out["log_density"] = float(dataset.mixture.log_prob_data(samples).mean())
        out["log_density_data"] = float(dataset.mixture.log_prob_data(ref).mean())
    return out
