"""Adapters between our convention (t = 0 data, z_t = α_t x + σ_t ε, ``denoise(z, t) -> x̂``) and
the conventions of peer code, so a peer's model can be driven by our samplers and ours by theirs.

* EDM / k-diffusion: ``D(z̃, σ̃) -> x̂`` on z̃ = z/α, σ̃ = σ/α = e^{−λ/2} (Karras et al. 2022, Eq. 1;
  k-diffusion ``model(x, sigma)``).
* torchcfm / flow_matching: time s = 1 − t with noise at s = 0, ``velocity(x, s) = dx/ds``
  (Lipman et al. 2023; Tong et al. 2024). On our path, dz/dt = α̇ x̂ + σ̇ ε̂, so dx/ds = −(α̇ x̂ + σ̇ ε̂)
  and, with z = α x̂ + σ ε̂, x̂ = (σ̇ z − σ dz/dt)/(σ̇ α − σ α̇).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["from_sigma_denoiser", "from_velocity", "to_sigma_denoiser", "to_velocity"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def from_sigma_denoiser(model: Callable[[Tensor, Tensor], Tensor], sched: Schedule) -> Denoiser:
    """EDM/k-diffusion ``model(z̃, σ̃) -> x̂`` → ``denoise(z, t)``."""

    def denoise(z: Tensor, t: Tensor) -> Tensor:
        o = sched(t)
        return model(z / o.alpha, o.sigma / o.alpha)

    return denoise


def to_sigma_denoiser(denoise: Denoiser, sched: Schedule) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoise(z, t)`` → EDM/k-diffusion ``model(z̃, σ̃) -> x̂``, t = t(λ = −2 log σ̃)."""

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        t = sched.t_of_logsnr(-2 * torch.log(torch.as_tensor(sigma, dtype=x.dtype)))
        return denoise(sched.alpha(t) * x, t)

    return model


def from_velocity(velocity: Callable[[Tensor, Tensor], Tensor], sched: Schedule) -> Denoiser:
    """torchcfm/flow_matching ``velocity(x, s) = dx/ds`` (s = 1 − t, noise at s = 0) on the path
    described by ``sched`` → ``denoise(z, t)``."""

    def denoise(z: Tensor, t: Tensor) -> Tensor:
        o = sched(t)
        dz_dt = -velocity(z, 1 - t)
        return (o.d_sigma * z - o.sigma * dz_dt) / (o.d_sigma * o.alpha - o.sigma * o.d_alpha)

    return denoise


def to_velocity(denoise: Denoiser, sched: Schedule) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoise(z, t)`` → ``velocity(x, s) = dx/ds`` with s = 1 − t."""

    def velocity(x: Tensor, s: Tensor) -> Tensor:
        t = 1 - torch.as_tensor(s, dtype=x.dtype)
        o = sched(t)
        x_hat = denoise(x, t)
        eps_hat = (x - o.alpha * x_hat) / o.sigma
        return -(o.d_alpha * x_hat + o.d_sigma * eps_hat)

    return velocity
