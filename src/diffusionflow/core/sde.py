"""SDE ⇄ schedule conversions (the blog, "SDE and flow views"; Song et al. 2021; Kingma et al. 2021).

Diffusion: dz = f_t z dt + g_t dW, sampled by dz = [f_t z − ½(1 + η_t²) g_t² ∇log p_t] dt + η_t g_t dW̄.
Flow / stochastic interpolant: z_t = α_t x + σ_t ε, sampled by dz = [u_t − ½ ε_t² ∇log p_t] dt + ε_t dW̄.

    diffusion → flow:  α_t = exp ∫_0^t f_s ds,   σ_t² = α_t² ∫_0^t g_s² / α_s² ds,   ε_t = η_t g_t
    flow → diffusion:  f_t = ∂_t log α_t,        g_t² = 2 α_t σ_t ∂_t(σ_t/α_t),   η_t = ε_t / g_t

and g_t² = −σ_t² λ'_t. The integrals are done by Gauss–Legendre quadrature in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .schedules import Schedule

__all__ = [
    "eta_from_interpolant_noise",
    "interpolant_noise_from_eta",
    "schedule_from_sde",
    "sde_from_schedule",
]


def sde_from_schedule(sched: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """(f_t, g_t²) with f = ∂_t log α and g² = 2 α σ ∂_t(σ/α) = 2σ(σ̇ α − σ α̇)/α."""
    o = sched(t)
    f = o.d_alpha / o.alpha
    g2 = 2 * o.sigma * (o.d_sigma * o.alpha - o.sigma * o.d_alpha) / o.alpha
    return f, g2


def schedule_from_sde(
    f: Callable[[Tensor], Tensor], g2: Callable[[Tensor], Tensor], t: Tensor, nodes: int = 64
) -> tuple[Tensor, Tensor]:
    """(α_t, σ_t) from the drift and squared diffusion coefficients, with α_0 = 1, σ_0 = 0."""
    x, w = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes))

    def integral(fn: Callable[[Tensor], Tensor], upper: Tensor) -> Tensor:
        """∫_0^upper fn(s) ds for each upper bound, by an n-point Gauss–Legendre rule."""
        s = 0.5 * upper[..., None] * (x + 1)  # (T, n)
        return 0.5 * upper * (w * fn(s)).sum(-1)

    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    log_alpha = integral(f, t)

    def integrand(s: Tensor) -> Tensor:
        return g2(s) * torch.exp(-2 * integral(f, s.reshape(-1)).reshape(s.shape))

    sigma2 = torch.exp(2 * log_alpha) * integral(integrand, t)
    return torch.exp(log_alpha), torch.sqrt(sigma2)


def eta_from_interpolant_noise(eps_t: Tensor, g: Tensor) -> Tensor:
    """η_t = ε_t / g_t."""
    return eps_t / g


def interpolant_noise_from_eta(eta: Tensor, g: Tensor) -> Tensor:
    """ε_t = η_t g_t."""
    return eta * g
