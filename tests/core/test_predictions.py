"""Predictions: exact round trips to (x̂, ε̂) and the MSE identities of math.md §1.2."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionflow.core import predictions, schedules

T = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)[:, None]


def random_pair(shape=(19, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        shape, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("pred_name", sorted(predictions.PREDICTIONS))
@pytest.mark.parametrize("sched_name", ["cosine", "flow", "edm", "linear"])
def test_round_trip_and_target(f64, pred_name, sched_name):
    pred, o = predictions.build(pred_name), schedules.build(sched_name)(T)
    x, eps = random_pair()
    z = o.alpha * x + o.sigma * eps
    out = pred.target(x, eps, o.alpha, o.sigma)
    x_hat, eps_hat = pred.to_x_eps(out, z, o.alpha, o.sigma)
    assert torch.allclose(x_hat, x, atol=1e-12) and torch.allclose(eps_hat, eps, atol=1e-10)
    raw = random_pair(seed=1)[0]
    assert torch.allclose(
        pred.from_x_eps(*pred.to_x_eps(raw, z, o.alpha, o.sigma), o.alpha, o.sigma), raw, atol=1e-10
    )
    # The targets by their definitions.
    a, s = o.alpha, o.sigma
    expected = {
        "eps": eps,
        "x": x,
        "v": a * eps - s * x,
        "flow": eps - x,
    }
    if pred_name in expected:
        assert torch.allclose(out, expected[pred_name], atol=1e-12)


@pytest.mark.parametrize("sched_name", ["cosine", "flow", "edm"])
def test_mse_identities(f64, sched_name):
    """‖out − target‖² = m(λ)‖ε̂ − ε‖² with m from the blog's table, for an arbitrary output."""
    o = schedules.build(sched_name)(T)
    x, eps = random_pair()
    z = o.alpha * x + o.sigma * eps
    lam = o.logsnr
    sd = 0.5
    factors = {
        "eps": torch.ones_like(lam),
        "x": torch.exp(-lam),
        "v": o.alpha**2 * (torch.exp(-lam) + 1) ** 2,
        "flow": (torch.exp(-lam / 2) + 1) ** 2,
        "edm": (torch.exp(-lam) + sd**2) / sd**2,
    }
    raw = random_pair(seed=2)[0]
    for name, factor in factors.items():
        pred = predictions.build(name, sigma_data=sd) if name == "edm" else predictions.build(name)
        _, eps_hat = pred.to_x_eps(raw, z, o.alpha, o.sigma)
        lhs = (raw - pred.target(x, eps, o.alpha, o.sigma)).pow(2).sum(-1)
        rhs = factor[:, 0] * (eps_hat - eps).pow(2).sum(-1)
        assert torch.allclose(lhs, rhs, rtol=1e-10), name
        assert torch.allclose(pred.mse_factor(o.alpha, o.sigma), factor, rtol=1e-12), name


def test_edm_matches_karras_table_1_on_ve(f64):
    """On α = 1: D = c_skip z + c_out F with EDM's Table 1 coefficients, c_in = 1/√(σ² + σ_d²)."""
    sd = 0.5
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)[:, None]
    alpha = torch.ones_like(sigma)
    pred = predictions.build("edm", sigma_data=sd)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
    z, f = random_pair((5, 3), seed=3)
    x_hat, _ = pred.to_x_eps(f, z, alpha, sigma)
    assert torch.allclose(x_hat, c_skip * z + c_out * f, atol=1e-12)
    assert torch.allclose(pred.c_in(alpha, sigma), 1 / torch.sqrt(sigma**2 + sd**2))
    assert torch.allclose(pred.c_noise(-2 * torch.log(sigma)), 0.25 * torch.log(sigma))


def test_edm_f_is_minus_v_on_vp_with_unit_sigma_data(f64):
    o = schedules.build("cosine")(T)
    x, eps = random_pair()
    f = predictions.build("edm", sigma_data=1.0).target(x, eps, o.alpha, o.sigma)
    v = predictions.build("v").target(x, eps, o.alpha, o.sigma)
    assert torch.allclose(f, -v, atol=1e-12)


def test_network_input_is_invariant_to_scaling_the_schedule(f64):
    """c_in z depends on (z̃, λ) only: the same for VP, flow and VE at equal λ."""
    x, eps = random_pair()
    lam = schedules.build("cosine").logsnr(T)
    pred = predictions.build("v")
    inputs = []
    for name in ("cosine", "flow", "edm"):
        s = schedules.build(name, **({"logsnr_min": -20.0, "logsnr_max": 20.0} if name == "edm" else {}))
        o = s(s.t_of_logsnr(lam))
        inputs.append(pred.c_in(o.alpha, o.sigma) * (o.alpha * x + o.sigma * eps))
    assert torch.allclose(inputs[0], inputs[1], atol=1e-12) and torch.allclose(
        inputs[0], inputs[2], atol=1e-12
    )


def test_c_noise_is_finite_at_infinite_logsnr(f64):
    c = predictions.build("flow").c_noise(torch.tensor([-math.inf, math.inf]))
    assert torch.isfinite(c).all()


def test_bad_options():
    with pytest.raises(
        ValueError, match="prediction='y' is unknown; allowed: \\['edm', 'eps', 'flow', 'v', 'x'\\]"
    ):
        predictions.build("y")
    with pytest.raises(ValueError, match="sigma_data=0"):
        predictions.build("edm", sigma_data=0)
