"""SDE ⇄ schedule conversions (the blog's exact formulas), numerically for any schedule."""

from __future__ import annotations

import pytest
import torch

from diffusionflow.core import schedules, sde

T = torch.linspace(0.05, 0.9, 18, dtype=torch.float64)


@pytest.mark.parametrize("name", ["flow", "cosine", "linear"])
@pytest.mark.parametrize("opts", [{}, {"scale": "vp"}, {"shift": 2.0}])
def test_flow_to_diffusion_to_flow_is_identity(f64, name, opts):
    sched = schedules.build(name, **opts)
    assert float(sched.alpha(torch.tensor(0.0))) == 1.0  # the integrals start from α_0 = 1, σ_0 = 0

    def f(t):
        return sde.sde_from_schedule(sched, t)[0]

    def g2(t):
        return sde.sde_from_schedule(sched, t)[1]

    alpha, sigma = sde.schedule_from_sde(f, g2, T, nodes=96)
    assert torch.allclose(alpha, sched.alpha(T), rtol=1e-9) and torch.allclose(
        sigma, sched.sigma(T), rtol=1e-7
    )


def test_diffusion_to_flow_closed_form_vp_sde(f64):
    """VP-SDE with β(t) = β_min + t(β_max − β_min): f = −β/2, g² = β gives the linear schedule."""
    lin = schedules.build("linear")
    alpha, sigma = sde.schedule_from_sde(lambda t: -0.5 * (0.1 + 19.9 * t), lambda t: 0.1 + 19.9 * t, T)
    assert torch.allclose(alpha, lin.alpha(T), rtol=1e-12) and torch.allclose(sigma, lin.sigma(T), rtol=1e-10)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_g2_is_minus_sigma2_dlogsnr(f64, name):
    """g² = 2ασ ∂_t(σ/α) with the derivative by finite differences, against −σ² λ'_t."""
    sched = schedules.build(name, shift=1.5)
    h = 1e-6
    ratio = lambda t: sched.sigma(t) / sched.alpha(t)  # noqa: E731
    g2_fd = 2 * sched.alpha(T) * sched.sigma(T) * (ratio(T + h) - ratio(T - h)) / (2 * h)
    _, g2 = sde.sde_from_schedule(sched, T)
    assert torch.allclose(g2, -(sched.sigma(T) ** 2) * sched.dlogsnr_dt(T), rtol=1e-12)
    assert torch.allclose(g2, g2_fd, rtol=1e-6)


def test_flow_g2_closed_form(f64):
    _, g2 = sde.sde_from_schedule(schedules.build("flow"), T)
    assert torch.allclose(g2, 2 * T / (1 - T))


def test_eta_and_interpolant_noise_round_trip(f64):
    g = torch.sqrt(sde.sde_from_schedule(schedules.build("cosine"), T)[1])
    eps_t = torch.linspace(0.1, 2.0, len(T))
    eta = sde.eta_from_interpolant_noise(eps_t, g)
    assert torch.allclose(sde.interpolant_noise_from_eta(eta, g), eps_t)
