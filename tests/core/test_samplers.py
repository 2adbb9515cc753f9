"""Samplers against the exact Gaussian-mixture oracle (the blog's claims as tests, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffusionflow.core import samplers, schedules
from diffusionflow.core.oracle import GaussianMixture
from diffusionflow.core.samplers import Levels
from helpers import make_mixture

SCALINGS = {
    "vp": lambda t: 1 / torch.sqrt((1 - t) ** 2 + t**2),
    "quadratic": lambda t: 1 + 3 * t**2,
    "exp": lambda t: torch.exp(-2 * t),
}


def oracle_denoiser(gmm, sched):
    return lambda z, t: gmm.x_hat(z, t, sched)


def noise(n=256, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- 1. DDIM is invariant to scaling the schedule; probability-flow Euler is not ---------------
@pytest.mark.parametrize("grid", ["uniform_t", "edm"])
def test_ddim_invariant_to_schedule_scaling_euler_is_not(gmm, grid):
    eps = noise()
    results = {}
    for name in ("ddim", "euler"):
        base = schedules.build("flow")
        ref = samplers.build(name, steps=12, grid=grid)(oracle_denoiser(gmm, base), eps, base)
        diffs = []
        for c in SCALINGS.values():
            scaled = schedules.build("flow", scale=c)
            out = samplers.build(name, steps=12, grid=grid)(oracle_denoiser(gmm, scaled), eps, scaled)
            diffs.append(float((out - ref).norm() / ref.norm()))
        results[name] = max(diffs)
    assert results["ddim"] < 1e-10
    assert results["euler"] > 1e-3


# ---- 2. Flow-matching Euler equals DDIM on the flow schedule --------------------------------
def test_flow_matching_euler_is_ddim_on_flow_schedule(gmm):
    sched = schedules.build("flow")
    t = torch.linspace(1, 0, 16, dtype=torch.float64)
    z = noise()
    for i in range(len(t) - 1):
        x_hat = gmm.x_hat(z, t[i], sched)
        u_hat = (z - (1 - t[i]) * x_hat) / t[i] - x_hat  # û = ε̂ − x̂
        z = z + (t[i + 1] - t[i]) * u_hat
    ddim = samplers.build("ddim", t_grid=t)(oracle_denoiser(gmm, sched), noise(), sched)
    assert torch.allclose(z, ddim, rtol=1e-12, atol=1e-12)


# ---- 3. DDPM = DDIM to λ + 2Δλ, then forward renoising to λ + Δλ ----------------------------
def _one_step_law(sampler, den, z, sched, t, s):
    """Mean and per-coordinate std of one stochastic step, from the step's noise input."""
    lv = Levels.on(sched, torch.tensor([t, s], dtype=torch.float64))
    mean = sampler.run(den, z, lv, lambda: torch.zeros_like(z))
    std = sampler.run(den, z, lv, lambda: torch.ones_like(z)) - mean
    return mean, std


@pytest.mark.parametrize("sched_name", ["cosine", "flow", "linear"])
def test_ddpm_step_is_ddim_double_step_plus_renoise(gmm, sched_name):
    sched = schedules.build(sched_name)
    den = oracle_denoiser(gmm, sched)
    t, s = 0.7, 0.55
    z = gmm.sample_t(64, t, sched, torch.Generator().manual_seed(3))
    ddpm_mean, ddpm_std = _one_step_law(samplers.build("ddpm"), den, z, sched, t, s)
    # The blog's construction, written out here: DDIM to λ_u = λ_t + 2Δλ, then q(z_s | z_u).
    lam_t, lam_s = sched.logsnr(torch.tensor(t)), sched.logsnr(torch.tensor(s))
    o_t, o_s = sched(torch.tensor(t)), sched(torch.tensor(s))
    o_u = sched(sched.t_of_logsnr(lam_t + 2 * (lam_s - lam_t)))
    x_hat = den(z, torch.tensor(t))
    z_u = o_u.alpha * x_hat + o_u.sigma * (z - o_t.alpha * x_hat) / o_t.sigma
    mean = o_s.alpha / o_u.alpha * z_u
    std = torch.sqrt(o_s.sigma**2 - (o_s.alpha * o_u.sigma / o_u.alpha) ** 2)
    assert torch.allclose(ddpm_mean, mean, atol=1e-12) and torch.allclose(
        ddpm_std, std.expand_as(z), atol=1e-12
    )
    for other in (samplers.build("churn", churn=0.5), samplers.build("ddim", eta=1.0)):
        m, sd = _one_step_law(other, den, z, sched, t, s)
        assert torch.allclose(m, mean, atol=1e-12) and torch.allclose(sd, std.expand_as(z), atol=1e-12)


def test_ddpm_step_marginal_covariance_on_one_component(f64):
    """On a single Gaussian the step is affine in z_t: push N(α μ, α²Σ + σ²I) through both forms."""
    one = make_mixture(components=1, seed=4)
    sched = schedules.build("cosine")
    den = oracle_denoiser(one, sched)
    t, s = 0.8, 0.6
    lam_t, lam_s = sched.logsnr(torch.tensor(t)), sched.logsnr(torch.tensor(s))
    o_t = sched(torch.tensor(t))
    cov_t = o_t.alpha**2 * one.covariances[0] + o_t.sigma**2 * torch.eye(2)
    mean_t = o_t.alpha * one.means[0]
    laws = []
    for sampler, grid in (
        (samplers.build("ddpm"), [t, s]),
        (samplers.build("ddim"), [t, float(sched.t_of_logsnr(lam_t + 2 * (lam_s - lam_t)))]),
    ):
        lv = Levels.on(sched, torch.tensor(grid, dtype=torch.float64))

        def step(z, sampler=sampler, lv=lv):
            return sampler.run(den, z, lv, lambda: torch.zeros_like(z))

        jac = torch.autograd.functional.jacobian(lambda z: step(z[None])[0], mean_t)
        laws.append((step(mean_t[None])[0], jac))
    (m1, a1), (m2, a2) = laws
    ddpm_mean, ddpm_cov = (
        m1,
        a1 @ cov_t @ a1.T
        + _one_step_law(samplers.build("ddpm"), den, mean_t[None], sched, t, s)[1][0, 0] ** 2 * torch.eye(2),
    )
    o_s, o_u = sched(torch.tensor(s)), sched(sched.t_of_logsnr(lam_t + 2 * (lam_s - lam_t)))
    r = o_s.alpha / o_u.alpha
    renoise_mean = r * m2
    renoise_cov = r**2 * (a2 @ cov_t @ a2.T) + (o_s.sigma**2 - (r * o_u.sigma) ** 2) * torch.eye(2)
    assert torch.allclose(ddpm_mean, renoise_mean, atol=1e-12) and torch.allclose(
        ddpm_cov, renoise_cov, atol=1e-12
    )


# ---- 7. Convergence orders against a high-accuracy probability-flow ODE solution -----------
def _reference(gmm, sched, z0, t0, t1):
    """scipy DOP853 on dz̃/dσ̃ = ε̂ (Karras et al. 2022, Eq. 4 with α folded into z̃), rtol 1e-12."""
    shape = z0.shape

    def rhs(sig, y):
        t = sched.t_of_logsnr(torch.tensor(-2 * math.log(sig)))
        a = sched.alpha(t)
        z = a * torch.from_numpy(y).reshape(shape)
        return gmm.eps_hat(z, t, sched).reshape(-1).numpy()

    s0, s1 = (float(sched.sigma(torch.tensor(t)) / sched.alpha(torch.tensor(t))) for t in (t0, t1))
    y0 = (z0 / sched.alpha(torch.tensor(t0))).reshape(-1).numpy()
    sol = solve_ivp(rhs, (s0, s1), y0, method="DOP853", rtol=1e-12, atol=1e-12)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


ORDERS = {"ddim": 1.0, "euler": 1.0, "heun": 2.0, "dpmpp_2m": 2.0}


@pytest.mark.parametrize("sched_name", ["cosine", "flow"])
def test_deterministic_samplers_converge_at_their_order(gmm, sched_name):
    """Over λ ∈ [−3, 3] on a widened mixture, where 8–64 steps are in the asymptotic regime."""
    gmm = GaussianMixture(0.5 * gmm.means, 2 * gmm.covariances + 0.3 * torch.eye(2), gmm.weights)
    sched = schedules.build(sched_name)
    lam0, lam1 = -3.0, 3.0
    t0, t1 = (float(sched.t_of_logsnr(torch.tensor(v))) for v in (lam0, lam1))
    z0 = gmm.sample_t(128, t0, sched, torch.Generator().manual_seed(5))
    ref = _reference(gmm, sched, z0, t0, t1)
    steps = [8, 16, 32, 64]
    for name, order in ORDERS.items():
        errors = []
        for n in steps:
            grid = sched.t_of_logsnr(torch.linspace(lam0, lam1, n + 1, dtype=torch.float64))
            sampler = samplers.build(name, t_grid=grid)
            lv = Levels.on(sched, grid)
            counted = []

            def den(z, t, counted=counted):
                counted.append(1)
                return gmm.x_hat(z, t, sched)

            out = sampler.run(den, z0, lv, lambda: None) / lv.alpha[-1]
            errors.append(float((out - ref).pow(2).sum(-1).mean().sqrt()))
            expected_nfe = 2 * n if name == "heun" else n
            assert len(counted) == expected_nfe, (name, n)
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert abs(slope - order) < 0.3, (name, slope, errors)


@pytest.mark.parametrize(
    ("name", "opts", "nfe"),
    [
        ("ddim", {}, 10),
        ("euler", {}, 10),
        ("heun", {}, 19),
        ("edm", {"S_churn": 5.0}, 19),
        ("dpmpp_2m", {}, 10),
        ("ddpm", {}, 10),
        ("sde", {"t_max": 0.99}, 10),
        ("churn", {}, 10),
    ],
)
def test_reported_nfe_counts_denoiser_calls(gmm, name, opts, nfe):
    sched = schedules.build("cosine")
    calls = []

    def den(z, t):
        calls.append(t)
        assert t.ndim == 0
        return gmm.x_hat(z, t, sched)

    sampler = samplers.build(name, steps=10, grid="edm", **opts)
    x = sampler(den, noise(16), sched, generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == len(calls) == nfe and torch.isfinite(x).all()


# ---- 8. Stochastic samplers reproduce the mixture's law at many steps -----------------------
def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


N_LAW = 2000


@pytest.fixture(scope="module")
def law_setup():
    torch.set_default_dtype(torch.float64)
    try:
        gmm = make_mixture(seed=1)
        g = torch.Generator().manual_seed(11)
        exact = gmm.sample(N_LAW, g)
        null = [energy_distance(gmm.sample(N_LAW, g), gmm.sample(N_LAW, g)) for _ in range(20)]
        yield gmm, exact, max(null)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "opts", "sched_name"),
    [
        ("ddpm", {}, "cosine"),
        ("ddim", {"eta": 1.0}, "cosine"),
        ("edm", {"S_churn": 40.0, "grid": "edm"}, "cosine"),
        ("sde", {"eta": 1.0}, "linear"),
        ("sde", {"diffusion": 0.5, "t_max": 0.999}, "flow"),
        ("churn", {"churn": 0.5}, "flow"),
        ("churn", {"churn": 0.3}, "cosine"),
    ],
)
def test_stochastic_samplers_reproduce_the_law(f64, law_setup, name, opts, sched_name):
    gmm, exact, null_max = law_setup
    sched = schedules.build(sched_name)
    sampler = samplers.build(name, steps=200, **opts)
    x = sampler(
        oracle_denoiser(gmm, sched), noise(N_LAW, seed=21), sched, generator=torch.Generator().manual_seed(2)
    )
    assert energy_distance(x, exact) < null_max


def test_law_statistic_has_power(f64, law_setup):
    """A coarse deterministic sampler is detected: the statistic is far outside the null range."""
    gmm, exact, null_max = law_setup
    sched = schedules.build("cosine")
    x = samplers.build("ddim", steps=3)(oracle_denoiser(gmm, sched), noise(N_LAW, seed=21), sched)
    assert energy_distance(x, exact) > 3 * null_max


def test_bad_options():
    with pytest.raises(ValueError, match="sampler='rk4' is unknown; allowed"):
        samplers.build("rk4")
    with pytest.raises(ValueError, match="steps=-3 must be >= 1"):
        samplers.build("ddim", steps=-3)
    with pytest.raises(ValueError, match="grid='log' is unknown"):
        samplers.build("heun", grid="log")
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.build("ddim", t_grid=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="eta=2.0 must be in"):
        samplers.build("ddim", eta=2.0)
    with pytest.raises(ValueError, match="churn=1.0 must be in"):
        samplers.build("churn", churn=1.0)


@pytest.mark.parametrize("name", ["heun", "edm"])
def test_second_order_step_from_alpha_zero_is_finite(gmm, name):
    """From t = 1 on the cosine schedule (α = 0: σ̃ = ∞) the first step is an Euler (DDIM) step."""
    sched = schedules.build("cosine")
    assert float(sched.alpha(torch.tensor(1.0))) == 0.0
    den = oracle_denoiser(gmm, sched)
    coarse = samplers.build(name, steps=10, grid="uniform_t")(den, noise(), sched)
    fine = samplers.build(name, steps=200, grid="uniform_t")(den, noise(), sched)
    assert float((coarse - fine).norm(dim=-1).median()) < 0.1  # the bug this guards against gave 1e13


def test_per_sample_generators_make_samples_independent_of_the_batch(gmm):
    """Sample i depends only on its own generator: a batch of 6 equals 6 batches of 1."""
    sched = schedules.build("cosine")
    den = oracle_denoiser(gmm, sched)
    eps = noise(6)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    sampler = samplers.build("ddpm", steps=8)
    whole = sampler(den, eps, sched, generator=gens(range(6)))
    parts = torch.cat([sampler(den, eps[i : i + 1], sched, generator=gens([i])) for i in range(6)])
    assert torch.allclose(whole, parts, atol=1e-12)
    with pytest.raises(ValueError, match="2 generators for a batch of 6"):
        sampler(den, eps, sched, generator=gens([0, 1]))


# ---- `stochastic` says whether a sampler draws fresh noise (reflow refuses those that do) -----------------
@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in samplers.SAMPLERS]
    + [("ddim", {"eta": 0.5}), ("edm", {"S_churn": 2.0}), ("sde", {"eta": 0.0}), ("churn", {"churn": 0.0})]
    + [("dpmpp_2m_sde", {"eta": 0.0})],
)
def test_stochastic_is_true_exactly_when_fresh_noise_changes_the_sample(gmm, name, options):
    """Same initial noise, two generators for the fresh noise: the samples differ iff ``stochastic``."""
    sched = schedules.build("cosine")
    sampler = samplers.build(name, steps=6, t_max=0.98, **options)
    runs = [
        sampler(oracle_denoiser(gmm, sched), noise(16), sched, torch.Generator().manual_seed(seed))
        for seed in (1, 2)
    ]
    assert sampler.stochastic == (not torch.equal(*runs)), sampler
