"""Negative log-likelihood of a trained model on points of its own data set (``evaluate nll``).

Two estimates per point, both from ``core.likelihood``:

* ``ode``: the exact log-density of the model's probability-flow ODE (Song et al. 2021, App. D.2),
  RK4 from t = ``T_MIN`` to t = 1; exact divergence for vectors (2-D toy data), the Hutchinson–Skilling
  estimate for images.
* ``elbo``: the continuous-time VDM bound (Kingma et al. 2021, Eq. 17) on λ ∈ ``ELBO_LOGSNR`` ∩ the
  schedule's range, a Gauss–Legendre rule in λ with fresh noise per node.

Vectors (toy 2-D) are continuous data: nats, and bits/dim with no offset; for a Gaussian mixture the
exact log-density of the same points is reported beside them (``data``: at t = 0; ``t_min``: at
t = ``T_MIN`` under the model's schedule, which is what the ODE estimates for a perfect model).
Images on a grid of L values in [−1, 1] (8-bit: L = 256, x = k/127.5 − 1; the native 8×8 digits:
L = 17) are dequantised uniformly within their bins and get the offset log₂((L − 1)/2)
(``core.likelihood.dequantization_offset``), so bits/dim bound the discrete NLL.
The model is conditioned on each point's label (guidance 1) for class-conditional runs: log p(x | y).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from diffusionflow.core.likelihood import (
    bits_per_dim,
    dequantization_offset,
    dequantize,
    elbo,
    ode_log_likelihood,
)

__all__ = [
    "ELBO_LOGSNR",
    "METHODS",
    "T_MIN",
    "data_points",
    "exact_nll",
    "grid_levels",
    "nll_estimates",
    "prepare",
    "summary",
]

METHODS = ("ode", "elbo")
T_MIN = 1e-5
ELBO_LOGSNR = (-12.0, 12.0)


def data_points(dataset: Any, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` points (x, labels) of ``dataset`` at indices drawn without replacement with ``seed``, read
    with random flips off (the data as stored)."""
    if hasattr(dataset, "hflip"):
        dataset.hflip = False
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num]
    pairs = [dataset[int(i)] for i in order]
    return torch.stack([x for x, _ in pairs]), torch.stack([torch.as_tensor(y) for _, y in pairs])


def grid_levels(x: Tensor) -> int | None:
    """L when every value of ``x`` lies on the grid k·2/(L − 1) − 1 of [−1, 1]: 256 for 8-bit pixels
    (checked first), else L from the smallest gap between distinct values (17 for the native 8×8
    digits); None for data on no such grid (continuous)."""
    values = torch.unique(x.double())
    if len(values) < 2 or values.min() < -1 - 1e-6 or values.max() > 1 + 1e-6:
        return None
    for steps in (255, round(2 / float(values.diff().min()))):
        k = (values + 1) * (steps / 2)
        if (k - k.round()).abs().max() < 1e-3:
            return steps + 1
    return None


def _batched(
    fn: Callable[[Tensor, Tensor | None, torch.Generator], Tensor],
    x: Tensor,
    labels: Tensor | None,
    batch_size: int,
    seed: int,
) -> Tensor:
    """fn on consecutive batches, one generator seeded with ``seed`` for all (so results depend on the
    seed and the batch size only)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(x), batch_size):
        y = None if labels is None else labels[start : start + batch_size]
        out.append(fn(x[start : start + batch_size], y, generator).cpu())
    return torch.cat(out)


def nll_estimates(
    module: Any,
    x: Tensor,
    labels: Tensor | None,
    methods: Sequence[str],
    *,
    steps: int,
    points: int,
    probes: int,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per-point NLL (nats) of each method in ``methods`` with its settings: {method: {"nll": (N,), ...}}.
    ``x`` is already dequantised where needed; it sets the dtype and device of the computation."""
    schedule = module.schedule
    vectors = x.ndim == 2
    divergence = "exact" if vectors else "hutchinson"
    data_variance = float(x.double().pow(2).mean())
    lo, hi = max(ELBO_LOGSNR[0], schedule.logsnr_min), min(ELBO_LOGSNR[1], schedule.logsnr_max)

    def ode(xb: Tensor, yb: Tensor | None, g: torch.Generator) -> Tensor:
        res = ode_log_likelihood(
            module.denoiser(yb, guidance=1.0),
            xb,
            schedule,
            steps=steps,
            t_min=T_MIN,
            divergence=divergence,
            probes=probes,
            generator=g,
            data_variance=data_variance,
        )
        return -res.log_prob

    def bound(xb: Tensor, yb: Tensor | None, g: torch.Generator) -> Tensor:
        denoise = module.denoiser(yb, guidance=1.0)
        return elbo(denoise, xb, schedule, logsnr_min=lo, logsnr_max=hi, points=points, generator=g).nll

    settings: dict[str, dict[str, Any]] = {
        "ode": {
            "integrator": "rk4",
            "steps": steps,
            "nfe": 4 * steps,
            "t_min": T_MIN,
            "t_max": 1.0,
            "divergence": divergence,
            "probes": None if vectors else probes,
            "prior": "N(0, (alpha^2 c + sigma^2) I) at t_max",
            "prior_c": data_variance,
        },
        "elbo": {"quadrature": "gauss_legendre", "points": points, "logsnr_min": lo, "logsnr_max": hi},
    }
    run = {"ode": ode, "elbo": bound}
    return {m: {"nll": _batched(run[m], x, labels, batch_size, seed), **settings[m]} for m in methods}


def summary(nll: Tensor, dim: int, offset: float, reference: Tensor | None = None) -> dict[str, float]:
    """Mean ± standard error over points of the NLL in nats and in bits/dim; with ``reference`` (the
    exact NLL of the same points) also the mean excess nll − reference ± its paired standard error."""
    nll = nll.double()
    sem = float(nll.std() / math.sqrt(len(nll)))
    out = {
        "nll_nats": float(nll.mean()),
        "nll_nats_sem": sem,
        "bits_per_dim": float(bits_per_dim(nll.mean(), dim, offset)),
        "bits_per_dim_sem": float(bits_per_dim(sem, dim)),
    }
    if reference is not None:
        excess = nll - reference.double()
        out |= {
            "excess_nats": float(excess.mean()),
            "excess_nats_sem": float(excess.std() / math.sqrt(len(nll))),
        }
    return out


def exact_nll(dataset: Any, x: Tensor, schedule: Any) -> dict[str, Tensor] | None:
    """For a Gaussian-mixture data set, −log p(x) of each point: ``data`` at t = 0 and ``t_min`` at
    t = ``T_MIN`` under ``schedule`` (what the ODE estimates for a perfect model); else None."""
    mixture = getattr(dataset, "mixture", None)
    if mixture is None:
        return None
    points = x.double().cpu()
    return {"data": -mixture.log_prob_data(points), "t_min": -mixture.log_prob(points, T_MIN, schedule)}


def prepare(x: Tensor, seed: int) -> tuple[Tensor, dict[str, Any]]:
    """Continuous vectors unchanged; images on a grid of L levels dequantised (generator ``seed``);
    returns the data and its description for ``nll.json`` (``offset_bits`` per dimension)."""
    levels = None if x.ndim == 2 else grid_levels(x)
    if levels is None:
        return x, {"dequantization": None, "offset_bits": 0.0}
    y = dequantize(x.double(), torch.Generator().manual_seed(seed), levels).to(x.dtype)
    info = {"dequantization": "uniform", "levels": levels, "offset_bits": dequantization_offset(levels)}
    return y, info
