"""Schedules: closed forms, derivatives, inverses, shift and scale transforms."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionflow.core import schedules

NAMES = sorted(schedules.SCHEDULES)
T = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


def central_difference(fn, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("opts", [{}, {"shift": 3.0}, {"scale": "vp"}, {"scale": lambda t: 1 + t**2}])
def test_derivatives_match_finite_differences(f64, name, opts):
    s = schedules.build(name, **opts)
    o = s(T)
    for value, deriv in [(s.alpha, o.d_alpha), (s.sigma, o.d_sigma), (s.logsnr, o.dlogsnr)]:
        num = central_difference(value, T)
        assert torch.allclose(deriv, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_logsnr_is_log_alpha2_over_sigma2_and_inverts(f64, name):
    s = schedules.build(name, shift=2.0)
    o = s(T)
    assert torch.allclose(o.logsnr, torch.log(o.alpha**2 / o.sigma**2), atol=1e-12)
    assert torch.allclose(s.t_of_logsnr(o.logsnr), T, atol=1e-12)
    assert (o.dlogsnr < 0).all()


def test_closed_forms(f64):
    t = T
    flow, cos = schedules.build("flow"), schedules.build("cosine")
    assert torch.allclose(flow.alpha(t), 1 - t, atol=1e-15) and torch.allclose(flow.sigma(t), t, atol=1e-15)
    assert torch.allclose(cos.alpha(t), torch.cos(math.pi * t / 2), atol=1e-15)
    assert torch.allclose(cos.sigma(t), torch.sin(math.pi * t / 2), atol=1e-15)
    lin = schedules.build("linear", beta_min=0.1, beta_max=20.0)
    assert torch.allclose(lin.alpha(t) ** 2, torch.exp(-0.1 * t - 0.5 * 19.9 * t**2), atol=1e-14)
    assert torch.allclose(lin.alpha(t) ** 2 + lin.sigma(t) ** 2, torch.ones_like(t))
    edm = schedules.build("edm")
    rho, smin, smax = 7.0, 0.002, 80.0
    expect = (smin ** (1 / rho) + t * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho
    assert torch.allclose(edm.sigma(t), expect, rtol=1e-12) and torch.allclose(
        edm.alpha(t), torch.ones_like(t)
    )


@pytest.mark.parametrize("name", ["cosine", "flow", "linear"])
def test_endpoints_are_reached(f64, name):
    s = schedules.build(name, logsnr_min=-7.0, logsnr_max=9.0)
    assert s.logsnr_min == pytest.approx(-7.0, abs=1e-10) and s.logsnr_max == pytest.approx(9.0, abs=1e-10)
    shifted = schedules.build(name, logsnr_min=-7.0, logsnr_max=9.0, shift=2.0)
    assert shifted.logsnr_min == pytest.approx(-7.0 - 2 * math.log(2), abs=1e-10)


def test_shift_is_sd3_and_diffusers_time_shift(f64):
    """SD3 §5.3.2: t_m = √(m/n) t / (1 + (√(m/n) − 1) t); diffusers: σ' = s σ / (1 + (s − 1) σ)."""
    for s in (0.5, 3.0):
        shifted = schedules.build("flow", shift=s)
        assert torch.allclose(shifted.sigma(T), s * T / (1 + (s - 1) * T), atol=1e-14)
        base = schedules.build("cosine")
        assert torch.allclose(schedules.build("cosine", shift=s).logsnr(T), base.logsnr(T) - 2 * math.log(s))


def test_scale_keeps_logsnr_and_multiplies(f64):
    base = schedules.build("flow")
    c = lambda t: 1 / torch.sqrt((1 - t) ** 2 + t**2)  # noqa: E731
    scaled = schedules.build("flow", scale=c)
    vp = schedules.build("flow", scale="vp")
    assert torch.allclose(scaled.logsnr(T), base.logsnr(T))
    assert torch.allclose(scaled.alpha(T), c(T) * (1 - T)) and torch.allclose(vp.alpha(T), scaled.alpha(T))
    assert torch.allclose(vp.alpha(T) ** 2 + vp.sigma(T) ** 2, torch.ones_like(T))
    assert torch.allclose(schedules.build("cosine", scale=2.0).sigma(T), 2 * torch.sin(math.pi * T / 2))


def test_derivatives_at_infinite_ends_are_the_limits(f64):
    flow = schedules.build("flow")(torch.tensor([0.0, 1.0]))
    assert torch.allclose(flow.d_alpha, torch.tensor([-1.0, -1.0]), atol=1e-8)
    assert torch.allclose(flow.d_sigma, torch.tensor([1.0, 1.0]), atol=1e-8)


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("cosine", {"logsnr_min": 5.0, "logsnr_max": -5.0}, "logsnr_min=5.0 must be < logsnr_max=-5.0"),
        ("flow", {"shift": -1.0}, "shift=-1.0"),
        ("nope", {}, "schedule='nope' is unknown; allowed: \\['cosine', 'edm', 'flow', 'linear'\\]"),
        ("linear", {"beta_min": 2.0, "beta_max": 1.0}, "beta_min=2.0"),
        ("edm", {"logsnr_min": -math.inf}, "must be finite"),
        ("flow", {"scale": -2.0}, "scale=-2.0: allowed a positive number, 'vp' or a callable"),
    ],
)
def test_bad_options_name_key_and_value(name, opts, match):
    with pytest.raises(ValueError, match=match):
        schedules.build(name, **opts)


class UniformLogSNR(schedules.VariancePreserving):
    """A new schedule as a short class: VP with λ linear in t, λ(t) = 10 − 20 t."""

    name = "uniform_logsnr"

    def logsnr(self, t):
        return 10.0 - 20.0 * t

    def dlogsnr_dt(self, t):
        return torch.full_like(t, -20.0)

    def t_of_logsnr(self, logsnr):
        return (10.0 - logsnr) / 20.0


def assert_consistent(s: schedules.Schedule) -> None:
    """Derivatives by finite differences; λ = log(α²/σ²); t_of_logsnr inverts λ."""
    o = s(T)
    for value, deriv in [(s.alpha, o.d_alpha), (s.sigma, o.d_sigma), (s.logsnr, o.dlogsnr)]:
        assert torch.allclose(deriv, central_difference(value, T), rtol=1e-6, atol=1e-7)
    assert torch.allclose(o.logsnr, torch.log(o.alpha**2 / o.sigma**2), atol=1e-12)
    assert torch.allclose(s.t_of_logsnr(o.logsnr), T, atol=1e-12)


def test_a_new_schedule_is_a_short_class_and_takes_the_wrappers(f64):
    bare = UniformLogSNR()
    lam = 10.0 - 20.0 * T
    assert torch.allclose(bare.alpha(T), torch.sqrt(torch.sigmoid(lam)), atol=1e-15)
    assert torch.allclose(bare.sigma(T), torch.sqrt(torch.sigmoid(-lam)), atol=1e-15)

    # Truncation (Kingma & Gao App. D): λ(1) = λ_min, λ(0) = λ_max, here λ = 9 − 16 t.
    truncated = schedules.Truncated(bare, logsnr_min=-7.0, logsnr_max=9.0)
    assert (truncated.logsnr_min, truncated.logsnr_max) == (pytest.approx(-7.0), pytest.approx(9.0))
    assert torch.allclose(truncated.logsnr(T), 9.0 - 16.0 * T, atol=1e-12)
    # Shift (SD3 §5.3.2): λ → λ − 2 log s, α² = sigmoid(λ − 2 log s).
    shifted = schedules.Shifted(bare, 2.0)
    assert torch.allclose(shifted.logsnr(T), lam - 2 * math.log(2.0), atol=1e-12)
    assert torch.allclose(shifted.alpha(T) ** 2, torch.sigmoid(lam - 2 * math.log(2.0)), atol=1e-15)
    # Scale (blog, "DDIM is invariant to scaling"): α, σ and their derivatives times c, λ unchanged.
    scaled, o = schedules.Scaled(bare, 3.0)(T), bare(T)
    assert torch.equal(scaled.logsnr, o.logsnr)
    for f in ("alpha", "sigma", "d_alpha", "d_sigma"):
        assert torch.allclose(getattr(scaled, f), 3.0 * getattr(o, f), rtol=1e-14)

    composed = schedules.Composed(bare, logsnr_min=-7.0, logsnr_max=9.0, shift=2.0, scale=lambda t: 1 + t)
    assert torch.allclose(composed.logsnr(T), 9.0 - 16.0 * T - 2 * math.log(2.0), atol=1e-12)
    assert torch.allclose(composed.alpha(T), (1 + T) * torch.sqrt(torch.sigmoid(composed.logsnr(T))))
    for s in (bare, truncated, shifted, composed, schedules.Composed(bare, shift=0.5, scale="vp")):
        assert_consistent(s)
    assert repr(schedules.Composed(bare, logsnr_min=-7.0, shift=2.0, scale=2.0)) == (
        "Composed(logsnr_min=-8.386, logsnr_max=8.614, shift=2.0, scale=2.0)"
    )
    with pytest.raises(ValueError, match="on a schedule scaled by 2.0"):
        schedules.Scaled(schedules.Scaled(bare, 2.0), "vp")
