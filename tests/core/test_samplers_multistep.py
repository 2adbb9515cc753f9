"""UniPC, DPM-Solver++(3M) and DPM-Solver++(2M) SDE against the Gaussian-mixture oracle (float64) and
against diffusers' schedulers on the same oracle, noise and grid."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from test_samplers import N_LAW, SCALINGS, _reference, energy_distance, law_setup, noise, oracle_denoiser

from diffusionflow.core import samplers, schedules
from diffusionflow.core.oracle import GaussianMixture
from diffusionflow.core.samplers import Levels
from helpers import load_script, make_mixture

__all__ = ["law_setup"]  # the fixture, shared with test_samplers

LAM0, LAM1 = -3.0, 3.0
STEPS = [8, 16, 32, 64]


@pytest.fixture(scope="module")
def order_setup() -> Iterator[tuple]:
    """test_samplers' widened mixture over λ ∈ [−3, 3] on the cosine schedule, and the DOP853 reference."""
    torch.set_default_dtype(torch.float64)
    try:
        base = make_mixture()
        gmm = GaussianMixture(0.5 * base.means, 2 * base.covariances + 0.3 * torch.eye(2), base.weights)
        sched = schedules.build("cosine")
        t0, t1 = (float(sched.t_of_logsnr(torch.tensor(v))) for v in (LAM0, LAM1))
        z0 = gmm.sample_t(128, t0, sched, torch.Generator().manual_seed(5))
        yield gmm, sched, z0, _reference(gmm, sched, z0, t0, t1)
    finally:
        torch.set_default_dtype(torch.float32)


def graded_grid(sched: schedules.Schedule, n: int) -> torch.Tensor:
    """n uniform steps in λ after two warm-up steps of h²/4: the warm-up's lower orders then add
    O(h⁴) to the global error, so the global error shows the method's own order (with uniform steps
    the first-order first step alone leaves O(h²))."""
    h = (LAM1 - LAM0) / n
    d = h**2 / 4
    lam = torch.cat([torch.tensor([LAM0, LAM0 + d]), torch.linspace(LAM0 + 2 * d, LAM1, n + 1)])
    return sched.t_of_logsnr(lam)


# ---- 1. convergence orders against the DOP853 reference --------------------------------------
ORDERS = [
    ("dpmpp_3m", {}, 3.0),
    ("dpmpp_3m", {"variant": "lu"}, 2.0),  # Lu et al.'s code, diffusers, k-diffusion: x̂″ term halved
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2.0),
    *(
        ("unipc", {"order": p, "variant": b, "corrector": c}, p + c)  # UniC raises the order by one
        for b in ("bh1", "bh2")
        for p in (1, 2, 3)
        for c in (False, True)
    ),
]


@pytest.mark.parametrize(("name", "opts", "order"), ORDERS)
def test_multistep_samplers_converge_at_their_order(order_setup, name, opts, order):
    gmm, sched, z0, ref = order_setup
    errors = []
    for n in STEPS:
        grid = graded_grid(sched, n)
        calls = []

        def den(z, t, calls=calls):
            calls.append(t)
            return gmm.x_hat(z, t, sched)

        lv = Levels.on(sched, grid)
        out = samplers.build(name, t_grid=grid, **opts).run(den, z0, lv, lambda: None) / lv.alpha[-1]
        assert len(calls) == len(grid) - 1  # NFE = steps, the corrector included
        errors.append(float((out - ref).pow(2).sum(-1).mean().sqrt()))
    slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (name, opts, slope, errors)


def test_unip3_is_the_taylor_3m(order_setup):
    """Both match the exact step through x̂″ with the same two past points: one update rule."""
    gmm, sched, z0, _ = order_setup
    grid = graded_grid(sched, 8)
    lv = Levels.on(sched, grid)
    den = oracle_denoiser(gmm, sched)
    unip = samplers.build("unipc", order=3, corrector=False, t_grid=grid).run(den, z0, lv, lambda: None)
    three_m = samplers.build("dpmpp_3m", t_grid=grid).run(den, z0, lv, lambda: None)
    assert torch.allclose(unip, three_m, rtol=1e-10, atol=1e-10)


# ---- 2. invariance to scaling the schedule ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("dpmpp_3m", {}),
        ("unipc", {"order": 3, "variant": "bh1"}),
        ("unipc", {"order": 2, "variant": "bh2"}),
        ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}),
    ],
)
def test_exponential_integrators_are_invariant_to_schedule_scaling(gmm, name, opts):
    """Each coefficient is a function of σ_s/σ_t, α_s and λ only, and z, α, σ scale together: the
    sample (z_N/α_N) is unchanged by (α, σ) → (c_t α, c_t σ), like DDIM's."""
    eps = noise()
    base = schedules.build("flow")
    ref = samplers.build(name, steps=12, grid="edm", **opts)(oracle_denoiser(gmm, base), eps, base)
    for c in SCALINGS.values():
        scaled = schedules.build("flow", scale=c)
        out = samplers.build(name, steps=12, grid="edm", **opts)(oracle_denoiser(gmm, scaled), eps, scaled)
        assert float((out - ref).norm() / ref.norm()) < 1e-10


# ---- 3. NFE, the α = 0 start, the stochastic sampler --------------------------------------------
@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("unipc", {}),
        ("unipc", {"order": 3, "variant": "bh1"}),
        ("dpmpp_3m", {}),
        ("dpmpp_2m_sde", {}),
        ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ],
)
@pytest.mark.parametrize("grid", ["uniform_t", "edm"])
def test_nfe_is_steps_and_the_alpha_zero_start_is_finite(gmm, name, opts, grid):
    """Counted by the base class; uniform_t on the cosine schedule starts at α = 0 (λ = −∞)."""
    sched = schedules.build("cosine")
    calls = []

    def den(z, t):
        calls.append(t)
        return gmm.x_hat(z, t, sched)

    sampler = samplers.build(name, steps=7, grid=grid, **opts)
    x = sampler(den, noise(16), sched, generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == len(calls) == 7 and torch.isfinite(x).all()


def test_sde_first_step_is_the_ddpm_step(gmm):
    """With η = 1 and no history the 2M SDE step is the DDPM posterior step, noise included."""
    sched = schedules.build("cosine")
    den = oracle_denoiser(gmm, sched)
    lv = Levels.on(sched, torch.tensor([0.7, 0.55], dtype=torch.float64))
    z = gmm.sample_t(32, 0.7, sched, torch.Generator().manual_seed(3))
    xi = noise(32, seed=4)
    sde = samplers.build("dpmpp_2m_sde").run(den, z, lv, lambda: xi)
    ddpm = samplers.build("ddpm").run(den, z, lv, lambda: xi)
    assert torch.allclose(sde, ddpm, rtol=1e-12, atol=1e-12)


def test_sde_per_sample_generators_make_samples_independent_of_the_batch(gmm):
    sched = schedules.build("cosine")
    den = oracle_denoiser(gmm, sched)
    eps = noise(6)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    sampler = samplers.build("dpmpp_2m_sde", steps=8)
    whole = sampler(den, eps, sched, generator=gens(range(6)))
    parts = torch.cat([sampler(den, eps[i : i + 1], sched, generator=gens([i])) for i in range(6)])
    assert torch.allclose(whole, parts, atol=1e-12)
    assert not torch.allclose(whole, sampler(den, eps, sched, generator=gens(range(6, 12))))


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_reproduces_the_law(f64, law_setup, solver_type):
    gmm, exact, null_max = law_setup
    sched = schedules.build("cosine")
    sampler = samplers.build("dpmpp_2m_sde", steps=50, solver_type=solver_type)
    x = sampler(
        oracle_denoiser(gmm, sched), noise(N_LAW, seed=21), sched, generator=torch.Generator().manual_seed(2)
    )
    assert energy_distance(x, exact) < null_max


def test_default_grid_is_uniform_t_shifted_by_two_elsewhere_unshifted():
    sched = schedules.build("cosine")
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2m_sde"):
        shifted = samplers.time_grid(sched, 10, "uniform_t", shift=2.0)
        assert torch.equal(samplers.build(name, steps=10).times(sched), shifted)
        assert torch.equal(
            samplers.build(name, steps=10, grid="edm").times(sched), samplers.time_grid(sched, 10, "edm")
        )


def test_bad_options():
    for name, opts, match in (
        ("unipc", {"order": 4}, "order=4 must be 1, 2 or 3"),
        ("unipc", {"variant": "bh3"}, "variant='bh3' is unknown; allowed: \\['bh1', 'bh2'\\]"),
        ("dpmpp_3m", {"variant": "kd"}, "variant='kd' is unknown; allowed: \\['taylor', 'lu'\\]"),
        ("dpmpp_2m_sde", {"eta": -1.0}, "eta=-1.0 must be >= 0"),
        ("dpmpp_2m_sde", {"solver_type": "rk"}, "solver_type='rk' is unknown; allowed"),
    ):
        with pytest.raises(ValueError, match=match):
            samplers.build(name, **opts)


# ---- 4. peer parity: diffusers' schedulers on the same oracle, noise and grid ----------------
@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("diffusers")
    return load_script("bench_samplers")


def _peer(bench, scheduler: str, **config):
    return bench.Peer("peer", scheduler, config, "edm")


PARITY = [
    ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "unipc", {"order": 2}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, "unipc", {"order": 3}),
    ("DPMSolverMultistepScheduler", {"solver_order": 2}, "dpmpp_2m", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m", {"variant": "lu"}),
]


@pytest.mark.parametrize(("scheduler", "config", "name", "opts"), PARITY)
@pytest.mark.parametrize("steps", [5, 10])
def test_diffusers_agrees_on_a_grid_to_data(f64, bench, scheduler, config, name, opts, steps):
    """EDM's grid to σ = 0 (diffusers lowers the order at the end below 15 steps, as we do)."""
    gmm, sched = make_mixture(), schedules.build("cosine")
    den, eps = oracle_denoiser(gmm, sched), noise(64)
    ours = samplers.build(name, steps=steps, grid="edm", **opts)
    x = bench.peer_sample(_peer(bench, scheduler, **config), den, eps, sched, ours.times(sched))
    y = ours(den, eps, sched)
    assert float((x - y).abs().max() / y.abs().max()) < 1e-5


@pytest.mark.parametrize("order", [2, 3])
def test_diffusers_unipc_bh1_agrees_on_a_grid_that_stops_short_of_data(f64, bench, order):
    """diffusers' B₁ is NaN on a step to σ = 0 (B(h) = −∞ times 0), so compare on a grid ending at
    σ̃ = 0.01, without its lower orders at the end (lower_order_final=False), as ours there."""
    gmm, sched = make_mixture(), schedules.build("cosine")
    den, eps = oracle_denoiser(gmm, sched), noise(64)
    times = samplers.time_grid(sched, 10, "edm")[:-1]
    ours = samplers.build("unipc", order=order, variant="bh1", t_grid=times)
    config = {"solver_order": order, "solver_type": "bh1", "lower_order_final": False}
    x = bench.peer_sample(_peer(bench, "UniPCMultistepScheduler", **config), den, eps, sched, times)
    y = ours(den, eps, sched)
    assert float((x - y).abs().max() / y.abs().max()) < 1e-5


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_diffusers_sde_agrees_with_the_same_noise(f64, bench, solver_type):
    gmm, sched = make_mixture(), schedules.build("cosine")
    den, eps = oracle_denoiser(gmm, sched), noise(64)
    ours = samplers.build("dpmpp_2m_sde", steps=8, grid="edm", solver_type=solver_type)
    peer = _peer(
        bench, "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_type=solver_type
    )
    x = bench.peer_sample(peer, den, eps, sched, ours.times(sched), torch.Generator().manual_seed(7))
    y = ours(den, eps, sched, generator=torch.Generator().manual_seed(7))
    assert float((x - y).abs().max() / y.abs().max()) < 1e-5
