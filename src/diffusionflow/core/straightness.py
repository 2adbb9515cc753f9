"""Straightness of a probability-flow path (Liu, Gong & Liu 2022, "Flow straight and fast", arXiv:2209.03003):

    S(Z) = ∫_0^1 E ‖(Z_1 − Z_0) − v(Z_t, t)‖² dt,

zero iff every path is a straight line run at constant speed, which one Euler step integrates exactly.

It is measured in flow coordinates, which makes it independent of the schedule: with
z̄ = z/(α + σ) and s = σ/(α + σ) = sigmoid(−λ/2), the forward process is z̄ = (1 − s) x + s ε on every
schedule, and the probability-flow ODE is dz̄/ds = ε̂ − x̂ (the blog "Diffusion Meets Flow Matching":
"DDIM = flow-matching Euler"). x̂ and ε̂ depend on z only through (z̄, s), so the path z̄(s) is the same
whatever the schedule. A DDIM step s_i → s_{i+1} is exactly the Euler step
z̄_{i+1} = z̄_i + (s_{i+1} − s_i)(ε̂_i − x̂_i), so integrating with many DDIM steps on a grid uniform in s
gives, on every schedule, the same piecewise-linear path and velocities u_i = ε̂_i − x̂_i.

On that path the mean velocity Σ_i w_i u_i / L (w_i = s_i − s_{i+1}, L = Σ_i w_i) is exactly
(z̄_start − z̄_end)/L, the chord Z_1 − Z_0 of Liu et al. when the path runs from s = 1 to s = 0 (L = 1),
and S is the w-weighted variance of the velocities along the path, per sample.

Worked case: for data N(μ, c² I) the path is z̄(s) = (1 − s) μ + g(s) ε with g(s) = √((1 − s)² c² + s²)
and ε the initial noise, so S = ‖ε‖²/D · (∫_0^1 g'(s)² ds − (1 − c)²) = (2 − π/2) c ‖ε‖²/D. Only the
point mass (c = 0) is exactly straight; standard-normal data (c = 1) is not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .samplers import DDIM, Levels, eps_from_x
from .schedules import Schedule

__all__ = ["flow_time_grid", "straightness"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def flow_time_grid(sched: Schedule, steps: int) -> Tensor:
    """``steps + 1`` descending times t, from t = 1 to t = 0, uniform in the flow time s = σ/(α + σ) =
    sigmoid(−λ/2) between its values at the two ends (1 and 0 for ``flow`` and ``cosine``). On the flow
    schedule it is the uniform-t grid; DDIM on it is flow-matching Euler with uniform steps on any
    schedule."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    ends = sched(torch.tensor([1.0, 0.0], dtype=torch.float64))
    s_hi, s_lo = (ends.sigma / (ends.alpha + ends.sigma)).tolist()
    s = torch.linspace(s_hi, s_lo, steps + 1, dtype=torch.float64)
    t = sched.t_of_logsnr(2 * (torch.log1p(-s) - torch.log(s))).clamp(0.0, 1.0)
    t[0], t[-1] = 1.0, 0.0
    return t


def straightness(denoise: Denoiser, noise: Tensor, sched: Schedule, steps: int = 256) -> Tensor:
    """Per-sample straightness S / D (D = dimensions of one sample) of the probability-flow path from
    ``noise`` (the sampler's initial noise: z̄ = s(1) · noise at t = 1) to the data end, integrated with
    ``steps`` DDIM steps on ``flow_time_grid``. ``denoise(z, t) -> x̂`` as for the samplers; returns (B,).

    The weighted variance is accumulated one step at a time (West's weighted form of Welford's update),
    so the velocities are never stored."""
    grid = flow_time_grid(sched, steps)
    lv = Levels.on(sched, grid, noise.dtype)
    lv_alpha, lv_sigma = lv.alpha.to(noise.device), lv.sigma.to(noise.device)
    w = -torch.diff(lv.sigma / (lv.alpha + lv.sigma)).to(noise.device)  # s_i − s_{i+1}
    step = 0
    weight = torch.zeros((), dtype=noise.dtype, device=noise.device)
    mean = torch.zeros_like(noise).flatten(1)
    spread = torch.zeros(noise.shape[0], dtype=noise.dtype, device=noise.device)

    def record(z: Tensor, t: Tensor) -> Tensor:
        nonlocal step, weight, mean, spread
        x_hat = denoise(z, t)
        eps_hat = eps_from_x(z, x_hat, lv_alpha[step], lv_sigma[step])
        u = (eps_hat - x_hat).flatten(1)
        weight = weight + w[step]
        delta = u - mean
        mean = mean + (w[step] / weight) * delta
        spread = spread + w[step] * (delta * (u - mean)).sum(1)
        step += 1
        return x_hat

    DDIM(t_grid=grid)(record, noise, sched)
    return spread / (weight * mean.shape[1])
