"""Sampler accuracy against the exact Gaussian-mixture oracle, as a function of NFE.

    python scripts/bench_samplers.py [--out DIR] [--quick]

For the 2-D mixture of the blog figures and a 16-D mixture with random full covariances, on the
cosine schedule (α = cos(πt/2), σ = sin(πt/2); ``--schedules cosine flow`` adds α = 1 − t, σ = t)
with the exact denoiser x̂ = E[x | z_t]:

* deterministic samplers (DDIM, PF-ODE Euler, EDM's Heun, DPM-Solver++(2M) and (3M), UniPC) are
  compared with the exact solution of the probability-flow ODE from the same noise: RMS (and median)
  over samples of ‖x − x_ref‖/√D. The reference is DOP853 (Hairer, Nørsett & Wanner 1993; scipy ``solve_ivp``)
  on dz/dt = α̇ x̂ + σ̇ ε̂ from the sampler's first grid point to t = 0, at rtol = atol = 1e-10; an
  8th-order adaptive solver on a smooth ODE makes the reference error negligible at a few hundred
  evaluations, where a fixed-step solver would need thousands. Its convergence is checked by
  solving again at 100 rtol (``reference gap``: the error of that coarser solve, so an upper
  estimate of the reference's own).
* stochastic samplers (DDPM, DDIM η = 1, EDM with churn, Euler–Maruyama on the reverse SDE, the
  blog's churn ½, DPM-Solver++(2M) SDE) are compared in law with exact samples by the energy distance
  (Székely & Rizzo 2013), printed beside its null value (two independent exact sample sets).
* where diffusers is installed (the ``bench`` extra), its schedulers run on the same oracle, noise and
  grid (``peer_sample``: our σ̃ = σ/α grid written into the scheduler, its sample z̃ scaled to its
  VP or VE convention), side by side with ours; for each method that exists on both sides the
  largest difference between the two final samples is printed (float32 precision expected:
  diffusers steps in float32). Its schedulers need a finite σ̃ at the first point, so they run on
  ``uniform_t`` from t_max = 0.999 where our rows start at α = 0.

Samplers are matched at equal NFE: Heun and EDM make 2N − 1 denoiser calls for N steps, so they
run (NFE + 1) // 2 steps, and the table shows their true NFE in brackets. Writes
``bench_samplers.md`` and ``bench_samplers.png`` (error vs NFE, log-log) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.integrate import solve_ivp
from torch import Tensor

from blog_figures import mixture_2d, new_figure, oracle_denoiser, oracle_precision
from diffusionflow.core import oracle, samplers, schedules

NFES = (5, 10, 20, 50, 100)
QUICK_NFES = (5, 10, 20)
WINNER_NFE = 10
REFERENCE_RTOL = 1e-10


@dataclass(frozen=True)
class Spec:
    """A sampler row: name, grid and options for ``samplers.build``."""

    sampler: str
    grid: str
    options: dict[str, float] = field(default_factory=dict)
    label: str = ""

    @property
    def title(self) -> str:
        return f"{self.label or self.sampler} / {self.grid}"

    def steps(self, nfe: int) -> int:
        """Steps for a budget of ``nfe`` denoiser calls (2N − 1 calls for Heun and EDM)."""
        return (nfe + 1) // 2 if self.sampler in ("heun", "edm") else nfe

    def build(self, nfe: int) -> samplers.Sampler:
        return samplers.build(self.sampler, steps=self.steps(nfe), grid=self.grid, **self.options)


NO_SHIFT, SHIFT2 = {"shift": 1.0}, {"shift": 2.0}
DETERMINISTIC = (
    Spec("ddim", "uniform_t"),
    Spec("ddim", "uniform_t", SHIFT2, "ddim shift 2"),
    Spec("ddim", "edm"),
    Spec("euler", "uniform_t"),
    Spec("euler", "edm"),
    Spec("heun", "edm"),
    Spec("dpmpp_2m", "uniform_t", NO_SHIFT),
    Spec("dpmpp_2m", "uniform_t", SHIFT2, "dpmpp_2m shift 2"),
    Spec("dpmpp_2m", "uniform_logsnr"),
    Spec("dpmpp_2m", "edm"),
    Spec("dpmpp_3m", "uniform_t", SHIFT2, "dpmpp_3m shift 2"),
    Spec("dpmpp_3m", "uniform_logsnr"),
    Spec("dpmpp_3m", "uniform_logsnr", {"variant": "lu"}, "dpmpp_3m lu"),
    Spec("unipc", "uniform_t", {"variant": "bh1", **NO_SHIFT}, "unipc-2 bh1"),
    Spec("unipc", "uniform_t", SHIFT2, "unipc-2 bh2 shift 2"),
    Spec("unipc", "uniform_t", {"order": 3, **SHIFT2}, "unipc-3 bh2 shift 2"),
    Spec("unipc", "edm", {}, "unipc-2 bh2"),
    Spec("unipc", "uniform_t", {"t_max": 0.999, **SHIFT2}, "unipc-2 bh2 shift 2 (t_max 0.999)"),
)
STOCHASTIC = (
    Spec("ddpm", "uniform_t"),
    Spec("ddim", "uniform_t", {"eta": 1.0}, "ddim η=1"),
    # EDM's ImageNet-64 churn (Karras et al. 2022; NVlabs/edm README: S_churn 40, S_tmin 0.05,
    # S_tmax 50), γ = min(40/N, √2 − 1) per step, with S_noise = 1: EDM's 1.003 offsets a trained
    # denoiser's excess noise removal, which the exact oracle does not have.
    Spec("edm", "edm", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0}, "edm S_churn=40"),
    # The reverse SDE's g_t is infinite at t = 1 on the cosine schedule: start just below.
    Spec("sde", "uniform_t", {"t_max": 0.999}, "sde η=1 (t_max 0.999)"),
    Spec("churn", "uniform_t", {"churn": 0.5}, "churn 0.5"),
    Spec("dpmpp_2m_sde", "uniform_t", SHIFT2, "dpmpp_2m_sde η=1 shift 2"),
    Spec("dpmpp_2m_sde", "edm", {}, "dpmpp_2m_sde η=1"),
)
PEER_T_MAX = {"t_max": 0.999}


@dataclass(frozen=True)
class Peer:
    """A diffusers scheduler row: the class, its options, our grid, and ``twin``, our spec of the same
    method (None where we have none), run on the same grid for the agreement check."""

    label: str
    scheduler: str
    config: dict[str, object]
    grid: str
    options: dict[str, float] = field(default_factory=dict)
    twin: Spec | None = None

    @property
    def title(self) -> str:
        return f"diffusers {self.label} / {self.grid}"

    def steps(self, nfe: int) -> int:
        return (nfe + 1) // 2 if self.scheduler == "HeunDiscreteScheduler" else nfe

    def times(self, sched: schedules.Schedule, nfe: int) -> Tensor:
        return samplers.time_grid(sched, self.steps(nfe), self.grid, **self.options)


def _peers(grid: str, options: dict[str, float]) -> tuple[Peer, ...]:
    """diffusers' schedulers for the deterministic table on one grid, each with its twin among ours."""
    dpm, unipc = "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"

    def twin(name: str, **opts: object) -> Spec:
        return Spec(name, grid, {**options, **opts})

    return (
        Peer("DDIM", "DDIMScheduler", {}, grid, options, twin("ddim")),
        Peer("Euler", "EulerDiscreteScheduler", {}, grid, options, twin("ddim")),
        Peer("Heun", "HeunDiscreteScheduler", {}, grid, options, twin("heun")),
        Peer("DPM++ 2M", dpm, {"solver_order": 2}, grid, options, twin("dpmpp_2m")),
        Peer("DPM++ 3M", dpm, {"solver_order": 3}, grid, options, twin("dpmpp_3m", variant="lu")),
        *(
            Peer(
                f"UniPC-{p} {b}",
                unipc,
                {"solver_order": p, "solver_type": b},
                grid,
                options,
                twin("unipc", order=p, variant=b),
            )
            for p, b in ((2, "bh1"), (2, "bh2"), (3, "bh1"), (3, "bh2"))
        ),
    )


PEERS = (*_peers("uniform_t", {**PEER_T_MAX, **SHIFT2}), *_peers("edm", {}))
PEER_SDE = (
    Peer(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        "edm",
        {},
        Spec("dpmpp_2m_sde", "edm", {}, "dpmpp_2m_sde η=1"),
    ),
)


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def peer_sample(
    peer: Peer,
    denoise: samplers.Denoiser,
    noise: Tensor,
    sched: schedules.Schedule,
    times: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """diffusers' ``peer.scheduler`` run on our grid ``times`` with our denoiser; returns z̃ at its end.

    Its sigmas are our σ̃ = σ/α (Heun's interleaved as its ``set_timesteps`` does); its sample is
    z̃ = z/α scaled to its convention: z̃/√(1 + σ̃²) for the VP schedulers (DPM-Solver, UniPC, DDIM; DDIM
    reads ᾱ = 1/(1 + σ̃²) from ``alphas_cumprod`` at N training steps), z̃ for Euler and Heun. Each
    call of the denoiser is at one of our grid points. The SDE's noise is the sequence our sampler
    draws from ``generator`` (one draw per step before the last)."""
    import diffusers

    lv = samplers.Levels.on(sched, times, noise.dtype)
    n = len(times) - 1
    sig = lv.sigma / lv.alpha
    heun, ddim = peer.scheduler == "HeunDiscreteScheduler", peer.scheduler == "DDIMScheduler"
    if not torch.isfinite(sig[0]) or ((heun or ddim) and sig[-1] != 0):
        raise ValueError(f"{peer.title}: the grid must start at a finite σ̃ (and end at σ̃ = 0 for DDIM, Heun)")
    config = {"prediction_type": "sample", **peer.config}
    if ddim:
        config |= {"num_train_timesteps": n, "clip_sample": False, "set_alpha_to_one": True}
    sch = getattr(diffusers, peer.scheduler)(**config)
    sch.set_timesteps(n)
    at = [0, *(i for i in range(1, n) for _ in range(2))] if heun else list(range(n))  # grid point per call
    if ddim:
        sch.alphas_cumprod = (1 / (1 + sig[:n] ** 2)).flip(0)
    else:
        sch.sigmas = sig[[*at, n]] if heun else sig.clone()
        sch.set_begin_index(0)
    vp = not heun and peer.scheduler != "EulerDiscreteScheduler"

    def scale(s: Tensor) -> Tensor:
        return 1 / torch.sqrt(1 + s**2) if vp else torch.ones_like(s)

    sde = peer.config.get("algorithm_type") == "sde-dpmsolver++"
    x = scale(sig[0]) * sig[0] * noise
    for k, (step_t, i) in enumerate(zip(sch.timesteps, at, strict=True)):
        if not vp:
            sch.scale_model_input(x, step_t)  # the pipeline's call: here it only marks the step (z̃ is ours)
        x_hat = denoise(lv.alpha[i] * x / scale(sig[i]), lv.t[i])
        extra = {}
        if sde:
            last = k == n - 1
            draw = (
                torch.zeros_like(noise)
                if last
                else torch.randn(noise.shape, generator=generator, dtype=noise.dtype)
            )
            extra = {"variance_noise": draw}
        x = sch.step(x_hat, step_t, x, **extra).prev_sample.to(noise.dtype)
    return x / scale(sig[-1])


def mixture_16d(seed: int = 0, dim: int = 16, components: int = 4) -> oracle.GaussianMixture:
    """A seeded mixture in ``dim`` dimensions: means N(0, 2²), full covariances s_k² (A Aᵀ/D + 0.1 I)
    with Gaussian A and spreads s_k log-spaced from 0.3 to 1, random weights in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(components, dim, generator=g)
    factors = torch.randn(components, dim, dim, generator=g)
    spreads = torch.logspace(math.log10(0.3), 0.0, components)
    covariances = spreads[:, None, None] ** 2 * (factors @ factors.mT / dim + 0.1 * torch.eye(dim))
    return oracle.GaussianMixture(means, covariances, torch.rand(components, generator=g) + 0.5)


# ---- reference and metrics ----------------------------------------------------------------------
def pf_ode_velocity(gmm: oracle.GaussianMixture, sched: schedules.Schedule, z: Tensor, t: Tensor) -> Tensor:
    """dz/dt = α̇ x̂ + σ̇ ε̂ (Song et al. 2021, Eq. 13 in α/σ form), with whichever of x̂, ε̂ the
    oracle gives directly and the other from z = α x̂ + σ ε̂, dividing by the larger of α, σ (so
    both ends, α = 0 and σ = 0, are exact)."""
    o = sched(t)
    if o.sigma >= o.alpha:
        x_hat = gmm.x_hat(z, t, sched)
        eps_hat = (z - o.alpha * x_hat) / o.sigma
    else:
        eps_hat = gmm.eps_hat(z, t, sched)
        x_hat = (z - o.sigma * eps_hat) / o.alpha
    return o.d_alpha * x_hat + o.d_sigma * eps_hat


def reference_solution(
    gmm: oracle.GaussianMixture, sched: schedules.Schedule, noise: Tensor, t_start: float, rtol: float
) -> Tensor:
    """The probability-flow ODE solved by DOP853 from z = σ(t_start) · noise at t_start to t = 0,
    returned as z_0/α_0 like the samplers' output (one system for the whole batch)."""
    shape = noise.shape

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(y).reshape(shape)
        return pf_ode_velocity(gmm, sched, z, torch.tensor(t)).reshape(-1).numpy()

    z0 = sched(torch.tensor(t_start)).sigma * noise
    sol = solve_ivp(rhs, (t_start, 0.0), z0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) / sched(torch.tensor(0.0)).alpha


def sample_errors(x: Tensor, ref: Tensor) -> Tensor:
    """‖x − x_ref‖/√D per sample."""
    return (x - ref).pow(2).mean(-1).sqrt()


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ (Székely & Rizzo 2013), V-statistic; 0 iff equal laws."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


# ---- benchmark ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One sampler: per metric, its value per NFE budget; and the true NFE per budget."""

    title: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    nfe: dict[int, int] = field(default_factory=dict)

    def add(self, nfe: int, true_nfe: int, **metrics: float) -> None:
        self.nfe[nfe] = true_nfe
        for name, value in metrics.items():
            self.values.setdefault(name, {})[nfe] = value


@dataclass
class MixtureResult:
    """The rows of one mixture under one schedule, with the reference's rtol and gap and the
    energy-distance null."""

    name: str
    dim: int
    n: int
    schedule: str
    deterministic: list[Row]
    stochastic: list[Row]
    rtol: float
    reference_gap: float
    null: float


def bench_deterministic(
    gmm: oracle.GaussianMixture,
    sched: schedules.Schedule,
    noise: Tensor,
    nfes: Sequence[int],
    specs: Sequence[Spec] = DETERMINISTIC,
    rtol: float = REFERENCE_RTOL,
    peers: Sequence[Peer] = (),
) -> tuple[list[Row], float]:
    """Each spec (then each diffusers ``peer``) at each NFE against the reference from its first grid
    point: the RMS and the median over samples of ``sample_errors``; a peer with a twin also records
    ``diff``, the largest |x_peer − x_twin| over samples and coordinates. Returns the rows and the
    largest difference between the references at rtol and 100 rtol."""
    denoise = oracle_denoiser(gmm, sched)
    references: dict[float, Tensor] = {}
    gap = 0.0

    def reference(t_start: float) -> Tensor:
        nonlocal gap
        if t_start not in references:
            references[t_start] = reference_solution(gmm, sched, noise, t_start, rtol)
            coarser = reference_solution(gmm, sched, noise, t_start, rtol * 100)
            gap = max(gap, float((coarser - references[t_start]).abs().max()))
        return references[t_start]

    def errors(row: Row, nfe: int, true_nfe: int, x: Tensor, t_start: float, **extra: float) -> None:
        e = sample_errors(x, reference(t_start))
        row.add(nfe, true_nfe, rms=float(e.pow(2).mean().sqrt()), median=float(e.median()), **extra)

    rows = []
    for spec in specs:
        row = Row(spec.title)
        for nfe in nfes:
            sampler = spec.build(nfe)
            x = sampler(denoise, noise, sched)
            errors(row, nfe, sampler.nfe, x, float(sampler.times(sched)[0]))
        rows.append(row)
    for peer in peers:
        row = Row(peer.title)
        for nfe in nfes:
            times = peer.times(sched, nfe)
            x = peer_sample(peer, denoise, noise, sched, times)
            diff = {}
            if peer.twin is not None:
                diff["diff"] = float((x - peer.twin.build(nfe)(denoise, noise, sched)).abs().max())
            true_nfe = 2 * len(times) - 3 if peer.scheduler == "HeunDiscreteScheduler" else len(times) - 1
            errors(row, nfe, true_nfe, x, float(times[0]), **diff)
        rows.append(row)
    return rows, gap


def bench_stochastic(
    gmm: oracle.GaussianMixture,
    sched: schedules.Schedule,
    n: int,
    nfes: Sequence[int],
    specs: Sequence[Spec] = STOCHASTIC,
    seed: int = 0,
    peers: Sequence[Peer] = (),
) -> tuple[list[Row], float]:
    """Energy distance of each spec's (then each diffusers peer's) samples to exact samples, a peer's
    twin run with the same noise for ``diff``; returns the rows and the null (the distance between
    two independent exact sample sets of the same size)."""
    denoise = oracle_denoiser(gmm, sched)
    exact = gmm.sample(n, torch.Generator().manual_seed(seed))
    null = energy_distance(exact, gmm.sample(n, torch.Generator().manual_seed(seed + 1)))
    rows = []
    for spec in specs:
        row = Row(spec.title)
        for nfe in nfes:
            g = torch.Generator().manual_seed(seed + 2)
            noise = torch.randn(n, gmm.dim, generator=g)
            sampler = spec.build(nfe)
            x = sampler(denoise, noise, sched, generator=g)
            row.add(nfe, sampler.nfe, energy=energy_distance(x, exact))
        rows.append(row)
    for peer in peers:
        row = Row(peer.title)
        for nfe in nfes:
            noise = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(seed + 2))
            x = peer_sample(
                peer, denoise, noise, sched, peer.times(sched, nfe), torch.Generator().manual_seed(seed + 3)
            )
            ours = peer.twin.build(nfe)(
                denoise, noise, sched, generator=torch.Generator().manual_seed(seed + 3)
            )
            row.add(nfe, nfe, energy=energy_distance(x, exact), diff=float((x - ours).abs().max()))
        rows.append(row)
    return rows, null


def bench_mixture(
    name: str,
    gmm: oracle.GaussianMixture,
    n: int,
    nfes: Sequence[int],
    schedule: str = "cosine",
    rtol: float = REFERENCE_RTOL,
    seed: int = 0,
    peers: bool = True,
) -> MixtureResult:
    """Both benchmarks on one mixture with ``n`` samples under one schedule, with diffusers' rows
    where ``peers`` and diffusers is installed."""
    sched = schedules.build(schedule)
    noise = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(seed))
    with_peers = peers and diffusers_available()
    deterministic, gap = bench_deterministic(
        gmm, sched, noise, nfes, rtol=rtol, peers=PEERS if with_peers else ()
    )
    stochastic, null = bench_stochastic(
        gmm, sched, n, nfes, seed=seed + 1, peers=PEER_SDE if with_peers else ()
    )
    return MixtureResult(name, gmm.dim, n, schedule, deterministic, stochastic, rtol, gap, null)


# ---- reporting ----------------------------------------------------------------------------------
def markdown_table(rows: Sequence[Row], nfes: Sequence[int], metric: str, null: float | None = None) -> str:
    """Rows sampler / grid, columns NFE, cells ``metric``; a cell's true NFE in brackets where it
    differs from the column's; a last ``null`` column when given."""
    head = ["sampler / grid", *(f"NFE {n}" for n in nfes), *(["null"] if null is not None else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            f"{row.values[metric][n]:.2e}" + (f" ({row.nfe[n]})" if row.nfe[n] != n else "") for n in nfes
        ]
        if null is not None:
            cells.append(f"{null:.2e}")
        lines.append("| " + " | ".join([row.title, *cells]) + " |")
    return "\n".join(lines)


def best(rows: Sequence[Row], metric: str, nfe: int) -> tuple[str, float]:
    """The title(s) with the lowest ``metric`` at ``nfe`` (ties within 1e-9, as for samplers that are
    one update rule, joined by " = ") and that value."""
    low = min(row.values[metric][nfe] for row in rows)
    tied = [row.title for row in rows if row.values[metric][nfe] <= low * (1 + 1e-9)]
    return " = ".join(tied), low


def report(results: Sequence[MixtureResult], nfes: Sequence[int]) -> str:
    """The Markdown report: three tables per mixture and schedule, then the best samplers at NFE 10."""
    parts = []
    for r in results:
        parts += [
            f"## {r.name} (D = {r.dim}), {r.schedule} schedule, {r.n} samples",
            "",
            "Deterministic: RMS over samples of ‖x − x_ref‖/√D, x_ref the probability-flow ODE solved by "
            f"DOP853 (rtol {r.rtol:g}) from the same noise; reference gap to rtol {r.rtol * 100:g}: "
            f"{r.reference_gap:.1e}.",
            "",
            markdown_table(r.deterministic, nfes, "rms"),
            "",
            "Deterministic, median over samples of ‖x − x_ref‖/√D (the RMS can be set by the few samples "
            "that a sampler's error carries across a boundary between components).",
            "",
            markdown_table(r.deterministic, nfes, "median"),
            "",
            "Stochastic: energy distance to exact samples; null = two independent exact sets "
            "(ddpm, ddim η=1 and churn 0.5 are one update rule, so with the same noise they agree).",
            "",
            markdown_table(r.stochastic, nfes, "energy", r.null),
            "",
        ]
        twins = [row for row in r.deterministic + r.stochastic if "diff" in row.values]
        if twins:
            parts += [
                "Agreement: max |x_diffusers − x_ours| over samples and coordinates, ours the same method on "
                "the same grid and noise (diffusers steps in float32).",
                "",
                markdown_table(twins, nfes, "diff"),
                "",
            ]
    if WINNER_NFE in nfes:
        for r in results:
            det, det_value = best(r.deterministic, "rms", WINNER_NFE)
            sto, sto_value = best(r.stochastic, "energy", WINNER_NFE)
            parts.append(
                f"At NFE {WINNER_NFE}, {r.name}, {r.schedule}: lowest RMS error {det} ({det_value:.2e}); "
                f"lowest energy distance {sto} ({sto_value:.2e}, null {r.null:.2e})."
            )
    return "\n".join(parts) + "\n"


def plot(results: Sequence[MixtureResult], path: Path) -> Figure:
    """RMS error (top) and energy distance (bottom) against true NFE, log-log, one column per
    mixture and schedule."""
    fig, axes = new_figure(len(results), 2, size=5.0)
    panels = (("deterministic", "rms", "RMS error vs PF-ODE"), ("stochastic", "energy", "energy distance"))
    for col, r in enumerate(results):
        for row, (kind, metric, ylabel) in enumerate(panels):
            ax = axes[row * len(results) + col]
            for line in getattr(r, kind):
                nfe, values = line.values[metric].keys(), line.values[metric].values()
                ax.loglog([line.nfe[n] for n in nfe], list(values), marker="o", ms=3, label=line.title)
            if metric == "energy":
                ax.axhline(r.null, color="k", ls=":", label="null")
            ax.set(xlabel="NFE", ylabel=ylabel, title=f"{r.name} (D = {r.dim}), {r.schedule}")
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return fig


def main(argv: Sequence[str] | None = None) -> list[MixtureResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the .md and .png")
    parser.add_argument("--quick", action="store_true", help="fewer samples, NFE 5, 10, 20")
    parser.add_argument(
        "--schedules", nargs="+", default=["cosine"], choices=["cosine", "flow"], help="schedules to run"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with oracle_precision():
        nfes = QUICK_NFES if args.quick else NFES
        sizes = (200, 100) if args.quick else (2000, 1000)
        mixtures = (("2-D mixture", mixture_2d()), ("16-D mixture", mixture_16d()))
        results = [
            bench_mixture(name, gmm, n, nfes, schedule)
            for schedule in args.schedules
            for (name, gmm), n in zip(mixtures, sizes, strict=True)
        ]
    text = report(results, nfes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_samplers.md").write_text(text)
    plot(results, args.out / "bench_samplers.png")
    print(text)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
