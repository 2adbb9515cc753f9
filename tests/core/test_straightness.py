"""Straightness (Liu et al. 2022) along the exact oracle's probability-flow path, in float64: zero for a
point mass, the closed form (2 − π/2) c ‖ε‖²/D for N(μ, c² I), positive for the blog mixture, and the
same value on every schedule (flow coordinates)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionflow.core import schedules
from diffusionflow.core.oracle import GaussianMixture
from diffusionflow.core.straightness import flow_time_grid, straightness
from diffusionflow.data.toy2d import mixture

MU = torch.tensor([[1.5, -0.5]], dtype=torch.float64)


def _noise(n: int = 256, dim: int = 2) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _gaussian(c: float) -> GaussianMixture:
    return GaussianMixture(MU, c**2 * torch.eye(2, dtype=torch.float64)[None])


def _oracle_straightness(gm: GaussianMixture, sched: schedules.Schedule, steps: int) -> torch.Tensor:
    return straightness(lambda z, t: gm.x_hat(z, t, sched), _noise(), sched, steps)


@pytest.mark.parametrize("name", ["flow", "cosine"])
def test_point_mass_is_straight(name):
    """The flow to a point mass μ is z̄(s) = (1 − s) μ + s ε: one straight line at constant speed."""
    s = _oracle_straightness(_gaussian(1e-12), schedules.build(name), steps=64)
    assert s.abs().max() < 1e-10


@pytest.mark.parametrize("c", [0.3, 1.0])
def test_gaussian_closed_form_with_first_order_quadrature(c):
    """Data N(μ, c² I): S = (2 − π/2) c ‖ε‖²/D (module docstring); DDIM = Euler in s converges in 1/N.
    Standard-normal data (c = 1) is not straight."""
    sched = schedules.build("flow")
    per_noise = _noise().pow(2).mean(1)  # ‖ε‖²/D
    exact = (2 - math.pi / 2) * c
    err = [(_oracle_straightness(_gaussian(c), sched, n) / per_noise - exact).abs().max() for n in (256, 512)]
    assert err[1] < 1 / 512
    assert 1.8 < err[0] / err[1] < 2.2


def test_blog_mixture_is_curved_and_schedule_invariant():
    """The same path in flow coordinates on flow, cosine, VP-scaled flow and shifted flow: the same
    straightness up to rounding (the grid is uniform in s on every schedule)."""
    blog = mixture("blog")
    values = [
        _oracle_straightness(blog, sched, steps=128)
        for sched in (
            schedules.build("flow"),
            schedules.build("cosine"),
            schedules.build("flow", scale="vp"),
            schedules.build("flow", shift=3.0),
        )
    ]
    assert values[0].mean() > 0.3
    for other in values[1:]:
        torch.testing.assert_close(other, values[0], rtol=1e-9, atol=1e-10)


def test_flow_time_grid_is_uniform_t_on_flow_and_starts_at_sigma_max_on_edm():
    torch.testing.assert_close(
        flow_time_grid(schedules.build("flow"), 8), torch.linspace(1, 0, 9, dtype=torch.float64)
    )
    edm = schedules.build("edm")
    t = flow_time_grid(edm, 8)
    o = edm(t[:-1])
    s = o.sigma / (o.alpha + o.sigma)
    assert t[0] == 1 and t[-1] == 0 and (t[1:] < t[:-1]).all()
    torch.testing.assert_close(s[1:] - s[:-1], torch.full((7,), float(s[1] - s[0]), dtype=torch.float64))
    assert s[0] == pytest.approx(80 / 81)
    with pytest.raises(ValueError, match="steps=0"):
        flow_time_grid(edm, 0)
