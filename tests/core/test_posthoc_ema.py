"""Post-hoc EMA (EDM2 §3, App. C): the closed forms against quadrature, σ_rel ⇄ γ, the per-update β
against the profile, and one EMA length reconstructed from two others on a synthetic weight trajectory."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffusionflow.core.posthoc_ema import (
    GAMMA_AT_MAX,
    MAX_RESIDUAL,
    SIGMA_REL_MAX,
    beta,
    check_reconstructable,
    gamma_of_sigma_rel,
    inner_product,
    profile,
    reconstruct,
    sigma_rel_of_gamma,
    solve_coefficients,
)
from diffusionflow.errors import ConfigError

F64 = torch.float64
GAMMAS = [-0.3, 0.0, 0.72, 6.94, 96.99]  # from below GAMMA_AT_MAX to σ_rel ≈ 0.01


def _integral(f, t: float, n: int = 400_001) -> float:
    """∫_0^t f(τ) dτ, trapezoids in u with τ = t u⁴: dense near τ = 0, where τ^γ (γ < 0) is singular."""
    u = torch.linspace(0.0, 1.0, n, dtype=F64)
    return float(torch.trapezoid(f(t * u**4) * 4 * t * u**3, u))


def _pieces(f, breaks: list[float], n: int = 20_000) -> float:
    """∫_0^max(breaks) f for an f that jumps at ``breaks``: the first piece as in ``_integral``, the others
    by the midpoint rule (which never evaluates f at a jump)."""
    edges = sorted({0.0, *breaks})
    total = _integral(f, edges[1])
    for a, b in itertools.pairwise(edges[1:]):
        h = (b - a) / n
        total += h * float(f(a + h * (torch.arange(n, dtype=F64) + 0.5)).sum())
    return total


@pytest.mark.parametrize("gamma", GAMMAS)
def test_profile_integrates_to_one(gamma):
    t = 3.7
    assert _integral(lambda tau: profile(tau, t, gamma), t) == pytest.approx(1.0, abs=1e-7)
    assert float(profile(torch.tensor([-1.0, 0.0, 1.01 * t], dtype=F64), t, gamma).abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("t_a", "g_a", "t_b", "g_b"),
    [(3.0, 0.5, 5.0, 6.9), (5.0, 0.5, 3.0, 6.9), (2.0, -0.3, 2.0, -0.3), (1.0, 96.99, 0.99, 10.3)],
)
def test_inner_product_closed_form_matches_quadrature(t_a, g_a, t_b, g_b):
    closed = float(inner_product(t_a, g_a, t_b, g_b))
    quad = _integral(lambda tau: profile(tau, t_a, g_a) * profile(tau, t_b, g_b), min(t_a, t_b))
    assert closed == pytest.approx(quad, rel=1e-6)
    assert float(inner_product(t_b, g_b, t_a, g_a)) == closed  # symmetric


def test_inner_product_does_not_overflow_in_images():
    """t ≈ 2·10⁹ images and γ ≈ 97: t^{γ+1} overflows float64, the closed form does not."""
    value = inner_product(2.1e9, 96.99, 2.0e9, 96.99)
    assert torch.isfinite(value) and value > 0
    scaled = float(inner_product(2.1, 96.99, 2.0, 96.99) * 2.1)  # ⟨·,·⟩ scales as 1/t
    assert float(value * 2.1e9) == pytest.approx(scaled, rel=1e-12)


@pytest.mark.parametrize("gamma", [-0.3, 0.72, 16.97])
def test_beta_updates_weigh_each_update_by_the_profile_over_it(gamma):
    """The running average θ̂ ← β θ̂ + (1 − β) θ, β = (1 − Δt/t)^{γ+1}, of one-hot weights θ_j = e_j gives
    each update j the weight ∫_{(j−1)Δt}^{jΔt} p_{t,γ}, t = KΔt: the profile exactly."""
    K, dt = 40, 32.0
    average = torch.zeros(K, dtype=F64)
    for j in range(1, K + 1):
        b = beta(j * dt, dt, gamma)
        average = b * average + (1 - b) * torch.eye(K, dtype=F64)[j - 1]
    t = K * dt
    cdf = (torch.arange(K + 1, dtype=F64) * dt / t) ** (gamma + 1)  # ∫_0^τ p = (τ/t)^{γ+1}
    torch.testing.assert_close(average, cdf.diff(), rtol=1e-12, atol=1e-15)
    j = 7
    inside = lambda tau: (tau > (j - 1) * dt) & (tau <= j * dt)  # noqa: E731
    quad = _pieces(lambda tau: profile(tau, t, gamma) * inside(tau), [(j - 1) * dt, j * dt, t])
    assert float(average[j - 1]) == pytest.approx(quad, rel=1e-5)


@pytest.mark.parametrize("sigma_rel", [0.001, 0.01, 0.05, 0.075, 0.1, 0.25, 0.3])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma > GAMMA_AT_MAX
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert gamma_of_sigma_rel(sigma_rel_of_gamma(gamma)) == pytest.approx(gamma, rel=1e-10)


@pytest.mark.parametrize("gamma", [-0.3, 0.72, 16.97])
def test_sigma_rel_is_the_profile_std_over_t(gamma):
    t = 2.0
    mean = _integral(lambda tau: tau * profile(tau, t, gamma), t)
    var = _integral(lambda tau: (tau - mean) ** 2 * profile(tau, t, gamma), t)
    assert math.sqrt(var) / t == pytest.approx(sigma_rel_of_gamma(gamma), rel=1e-6)


def test_widest_profile():
    grid = torch.linspace(-0.999, 50.0, 200_001, dtype=F64).tolist()
    widest = max(grid, key=sigma_rel_of_gamma)
    assert widest == pytest.approx(GAMMA_AT_MAX, abs=1e-3)
    assert sigma_rel_of_gamma(widest) == pytest.approx(SIGMA_REL_MAX, rel=1e-8)
    assert max(map(sigma_rel_of_gamma, grid)) <= SIGMA_REL_MAX


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.5, SIGMA_REL_MAX])
def test_sigma_rel_outside_the_profiles_is_refused(sigma_rel):
    with pytest.raises(ConfigError, match=rf"sigma_rel={sigma_rel} .*allowed: 0 < sigma_rel < 0.3003"):
        gamma_of_sigma_rel(sigma_rel)


def test_residual_closed_form_matches_quadrature():
    """‖Σ x_i p_i − p_r‖ / ‖p_r‖ from A, b and ⟨p_r, p_r⟩ against quadrature of the difference."""
    ts = [0.25, 0.5, 0.75, 1.0] * 2
    gammas = [gamma_of_sigma_rel(0.05)] * 4 + [gamma_of_sigma_rel(0.10)] * 4
    gamma_r = gamma_of_sigma_rel(0.075)
    x, residual = solve_coefficients(ts, gammas, 1.0, gamma_r)

    def diff2(tau):
        mix = sum(c * profile(tau, t, g) for c, t, g in zip(x.tolist(), ts, gammas, strict=True))
        return (mix - profile(tau, 1.0, gamma_r)) ** 2

    quad = math.sqrt(_pieces(diff2, ts) / float(inner_product(1.0, gamma_r, 1.0, gamma_r)))
    assert 1e-3 < residual < MAX_RESIDUAL  # a real residual, not the float64 floor
    assert residual == pytest.approx(quad, rel=1e-4)


def _random_walk_snapshots():
    """A 1000-update random walk of a 64-vector (Δt = 32 images), float64; profiles σ_rel 0.05 and 0.10
    snapshotted every 50 updates, and σ_rel 0.075 tracked directly, all with the per-update β."""
    steps, dt, every = 1000, 32.0, 50
    theta = torch.randn(steps, 64, generator=torch.Generator().manual_seed(0), dtype=F64).cumsum(0)
    sigma_rels = (0.05, 0.10, 0.075)
    gammas = [gamma_of_sigma_rel(s) for s in sigma_rels]
    averages = [torch.zeros(64, dtype=F64) for _ in sigma_rels]
    snapshots = []
    for k in range(1, steps + 1):
        for i, gamma in enumerate(gammas):
            averages[i] = torch.lerp(theta[k - 1], averages[i], beta(k * dt, dt, gamma))
        if k % every == 0:
            snapshots += [(k * dt, gammas[i], {"w": averages[i].clone()}) for i in (0, 1)]
    return theta, dt, dict(zip(sigma_rels, averages, strict=True)), snapshots


def test_reconstruction_from_two_profiles_matches_the_directly_tracked_one():
    """σ_rel 0.075 from 20 snapshots each of 0.05 and 0.10 against 0.075 tracked directly. The error is
    ∫ e θ with e = Σ x_i p_i − p_r, so by Cauchy–Schwarz ‖error‖ ≤ ‖e‖ (∫ ‖θ‖²)^{1/2} (θ constant over each
    update): a bound from the residual alone. Tolerances: that bound, and an error below 1 % of the gap
    between the two tracked averages (what the reconstruction has to interpolate)."""
    theta, dt, direct, snapshots = _random_walk_snapshots()
    t_r = len(theta) * dt
    gamma_r = gamma_of_sigma_rel(0.075)
    _, residual = solve_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots], t_r, gamma_r)
    error = (reconstruct(snapshots, 0.075)["w"] - direct[0.075]).norm()
    norm_p_r = math.sqrt(float(inner_product(t_r, gamma_r, t_r, gamma_r)))
    bound = residual * norm_p_r * math.sqrt(dt * float((theta**2).sum()))
    gap = (direct[0.05] - direct[0.10]).norm()
    print(  # the figures of the report (pytest -s)
        f"\nsigma_rel 0.075 from 0.05+0.10 (2x20 snapshots): residual {residual:.3e}, "
        f"|error|/|direct| {error / direct[0.075].norm():.3e}, |error|/gap {error / gap:.3e}, "
        f"|error| {error:.3e} <= bound {bound:.3e}"
    )
    assert error <= bound
    assert error < 0.01 * gap
    for tracked in (0.05, 0.10):  # a tracked profile at its last snapshot: the snapshot itself
        rel = (reconstruct(snapshots, tracked)["w"] - direct[tracked]).norm() / direct[tracked].norm()
        print(f"sigma_rel {tracked} (tracked) reconstructed: |error|/|direct| {rel:.3e}")
        assert rel < 1e-10


def test_reconstruct_keeps_dtypes_and_takes_integer_buffers_from_the_newest_snapshot():
    snapshots = [
        (t, gamma_of_sigma_rel(s), {"w": torch.full((3,), t, dtype=torch.float32), "n": torch.tensor(int(t))})
        for t in (1.0, 2.0, 3.0, 4.0)
        for s in (0.05, 0.10)
    ]
    out = reconstruct(snapshots, 0.10)
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64 and int(out["n"]) == 4
    torch.testing.assert_close(out["w"], torch.full((3,), 4.0))  # the 0.10 snapshot at t = 4


def test_unreachable_sigma_rel_is_refused_naming_residual_and_range():
    """Only (t, γ) are needed: a caller checks before loading any weights."""
    ts = [50.0 * k for k in range(1, 21)] * 2
    gammas = [gamma_of_sigma_rel(0.05)] * 20 + [gamma_of_sigma_rel(0.10)] * 20
    assert check_reconstructable(ts, gammas, 1000.0, 0.075).shape == (40,)
    message = (
        r"sigma_rel=0.001 is outside what the stored EMA profiles can reconstruct: from 40 snapshots of "
        r"sigma_rel \[0.05, 0.1\] up to t=1000 images its relative L2 residual is 0\.\d+ > 0.05; "
        r"reconstructable: sigma_rel about 0.02\d* to 0.2\d*"
    )
    with pytest.raises(ConfigError, match=message):
        check_reconstructable(ts, gammas, 1000.0, 0.001)
    with pytest.raises(ConfigError, match="no post-hoc EMA snapshots"):
        reconstruct([], 0.1)
