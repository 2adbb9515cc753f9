"""Samplers with one signature (k-diffusion style): ``x = sampler(denoise, noise, sched, generator)``.

``denoise(z, t) -> x̂`` is the data prediction E[x | z_t = z] (a trained model through its
prediction, a peer's model through ``adapters``, or the exact ``oracle``); ``t`` is a 0-dim tensor.
Sampling starts at z = σ(t_0) · noise and returns z_N / α(t_N): the data when the grid ends at
t = 0. The last point of a grid that ends at t = 0 is clean data, σ = 0, even for a schedule whose
λ_max is finite (EDM appends σ = 0 the same way, Karras et al. 2022, Eq. 5). ``sampler.nfe`` is the
number of denoiser calls of the last run.

Notation per step t → s (s < t): α, σ, λ at the current and next grid point; x̂, ε̂ from the
denoiser, ε̂ = (z − α x̂)/σ; σ̃ = σ/α and z̃ = z/α (EDM's variables).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import Registry
from .schedules import Schedule

__all__ = [
    "DDIM",
    "DDPM",
    "GRIDS",
    "SAMPLERS",
    "SDE",
    "Churn",
    "DPMSolverPP2M",
    "DPMSolverPP2MSDE",
    "DPMSolverPP3M",
    "EDMSampler",
    "Euler",
    "Heun",
    "Levels",
    "Sampler",
    "UniPC",
    "build",
    "eps_from_x",
    "pf_velocity",
    "seeded_noise",
    "time_grid",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
GRIDS = ("uniform_t", "uniform_logsnr", "edm")
GRID_OPTIONS = ("t_max", "rho", "sigma_min", "sigma_max", "shift")


def time_grid(
    sched: Schedule,
    steps: int,
    kind: str = "uniform_t",
    *,
    t_max: float = 1.0,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    shift: float = 1.0,
) -> Tensor:
    """A descending grid of ``steps + 1`` times ending at t = 0.

    * ``uniform_t``: t_i = t_max (1 − i/N).
    * ``uniform_logsnr``: λ uniform from the noisiest to the cleanest level, then t = 0.
    * ``edm``: σ̃_i = (σ̃_hi^{1/ρ} + i/(N−1)·(σ̃_lo^{1/ρ} − σ̃_hi^{1/ρ}))^ρ for i < N, then t_N = 0
      (Karras et al. 2022, Eq. 5: N noise levels and the final σ = 0; Heun then makes 2N − 1 calls).

    For the last two, σ̃_hi = min(sigma_max, σ̃(t_max)) and σ̃_lo = max(sigma_min, σ̃(0)) (EDM's
    defaults 80 and 0.002). ``shift`` s moves every point to λ − 2 log s (SD3 §5.3.2 time shift).
    """
    if steps < 1:
        raise ValueError(f"sampler steps={steps} must be >= 1")
    if kind not in GRIDS:
        raise ValueError(f"sampler grid={kind!r} is unknown; allowed: {list(GRIDS)} or an explicit t_grid")
    if not 0 < t_max <= 1:
        raise ValueError(f"sampler t_max={t_max} must be in (0, 1]")
    f64 = torch.float64
    if kind == "uniform_t":
        t = torch.linspace(t_max, 0.0, steps + 1, dtype=f64)
    else:
        sig_hi = min(sigma_max, math.exp(-0.5 * float(sched.logsnr(torch.tensor(t_max, dtype=f64)))))
        sig_lo = max(sigma_min, math.exp(-0.5 * float(sched.logsnr(torch.tensor(0.0, dtype=f64)))))
        if not sig_lo < sig_hi:
            raise ValueError(f"sampler grid {kind}: empty σ̃ range [{sig_lo}, {sig_hi}]")
        u = torch.linspace(0.0, 1.0, steps, dtype=f64)
        if kind == "uniform_logsnr":
            logsnr = -2 * (math.log(sig_hi) + u * (math.log(sig_lo) - math.log(sig_hi)))
        else:
            logsnr = (
                -2 * rho * torch.log(sig_hi ** (1 / rho) + u * (sig_lo ** (1 / rho) - sig_hi ** (1 / rho)))
            )
        t = torch.cat([sched.t_of_logsnr(logsnr), torch.zeros(1, dtype=f64)])
    if shift != 1.0:
        shifted = sched.t_of_logsnr(sched.logsnr(t) - 2 * math.log(shift))
        t = torch.where(t == 0, t, shifted)
    return t


@dataclass(frozen=True)
class Levels:
    """The schedule on a grid: t, α, σ, λ and dα/dt, dσ/dt, each (N + 1,), and the schedule."""

    sched: Schedule
    t: Tensor
    alpha: Tensor
    sigma: Tensor
    logsnr: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @classmethod
    def on(cls, sched: Schedule, t: Tensor, dtype: torch.dtype = torch.float64) -> Levels:
        """Computed in float64, then cast to ``dtype``."""
        o = sched(t.to(torch.float64))
        sigma, logsnr = o.sigma.clone(), o.logsnr.clone()
        if t[-1] == 0:  # the last point is data
            sigma[-1], logsnr[-1] = 0.0, math.inf
        fields = (t, o.alpha, sigma, logsnr, o.d_alpha, o.d_sigma)
        return cls(sched, *(f.to(dtype) for f in fields))


def seeded_noise(
    seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float64
) -> tuple[Tensor, list[torch.Generator]]:
    """Per-sample seeds (EDM's ``generate.py --seeds``): sample i's initial noise is the first draw of
    ``torch.Generator().manual_seed(seeds[i])``, and the same generators, passed to a sampler, give its
    fresh noise. A sample then depends only on its seed, not on batch size, batch order or rank."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in gens]), gens


class _Counter:
    """Wraps a denoiser and counts its calls."""

    def __init__(self, denoise: Denoiser) -> None:
        self.denoise, self.calls = denoise, 0

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.denoise(z, t)


class Sampler:
    """Base class: ``steps``, a grid by name (``grid`` + its options) or an explicit ``t_grid``;
    subclasses implement ``run(denoise, z, levels, noise_fn) -> z_N``."""

    name = "sampler"

    def __init__(
        self,
        steps: int = 18,
        grid: str = "uniform_t",
        t_grid: Tensor | list[float] | None = None,
        **grid_options: float,
    ) -> None:
        if steps < 1:
            raise ValueError(f"sampler {self.name}: steps={steps} must be >= 1")
        if grid not in GRIDS:
            raise ValueError(f"sampler {self.name}: grid={grid!r} is unknown; allowed: {list(GRIDS)}")
        if t_grid is not None:
            t_grid = torch.as_tensor(t_grid, dtype=torch.float64)
            if t_grid.ndim != 1 or len(t_grid) < 2 or not (t_grid[1:] < t_grid[:-1]).all():
                raise ValueError(
                    f"sampler {self.name}: t_grid must be a strictly descending list of >= 2 times"
                )
            if t_grid.min() < 0:
                raise ValueError(f"sampler {self.name}: t_grid has negative times {t_grid.tolist()}")
            steps = len(t_grid) - 1
        unknown = sorted(set(grid_options) - set(GRID_OPTIONS))
        if unknown:
            raise ValueError(
                f"sampler {self.name}: unknown options {unknown}; grid options are {list(GRID_OPTIONS)}"
            )
        self.steps, self.grid, self.t_grid, self.grid_options = steps, grid, t_grid, grid_options
        self.nfe = 0

    def times(self, sched: Schedule) -> Tensor:
        if self.t_grid is not None:
            return self.t_grid
        return time_grid(sched, self.steps, self.grid, **self.grid_options)

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        denoise: Denoiser,
        noise: Tensor,
        sched: Schedule,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """``generator`` may be one generator per sample (EDM's per-seed generation): then sample i's
        noise, initial and fresh, depends only on its own generator, not on batch size or rank."""
        lv = Levels.on(sched, self.times(sched).to(torch.float64), noise.dtype)
        counted = _Counter(denoise)

        def fresh_noise() -> Tensor:
            if isinstance(generator, Sequence):
                if len(generator) != noise.shape[0]:
                    raise ValueError(f"{len(generator)} generators for a batch of {noise.shape[0]}")
                rows = [torch.randn(noise.shape[1:], generator=g, dtype=noise.dtype) for g in generator]
                return torch.stack(rows).to(noise.device)
            return torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)

        z = self.run(counted, lv.sigma[0] * noise, lv, fresh_noise)
        self.nfe = counted.calls
        return z / lv.alpha[-1]

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws fresh noise (its sample is then not a function of the initial noise)."""
        return False

    def __repr__(self) -> str:
        opts = {k: v for k, v in vars(self).items() if k not in ("nfe", "t_grid") and v is not None}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in opts.items())})"


def eps_from_x(z: Tensor, x_hat: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = (z − α x̂)/σ, the noise that x̂ implies for z = α x + σ ε."""
    return (z - alpha * x_hat) / sigma


def pf_velocity(
    z: Tensor, x_hat: Tensor, alpha: Tensor, sigma: Tensor, d_alpha: Tensor, d_sigma: Tensor
) -> Tensor:
    """dz/dt of the probability-flow ODE, α̇ x̂ + σ̇ ε̂ (Song et al. 2021, Eq. 13, written with the
    interpolant's velocity: the blog's u_t = α̇ x + σ̇ ε with x, ε replaced by their estimates)."""
    return d_alpha * x_hat + d_sigma * eps_from_x(z, x_hat, alpha, sigma)


class DDIM(Sampler):
    """DDIM (Song et al. 2021, Eq. 12): z_s = α_s x̂ + √(σ_s² − σ_η²) ε̂ + σ_η ξ with
    σ_η² = η² σ_s² (1 − e^{λ_t − λ_s}) (math.md §5). η = 0 is deterministic DDIM (= flow-matching
    Euler on any schedule, invariant to scaling it); η = 1 samples the DDPM posterior."""

    name = "ddim"

    def __init__(self, steps: int = 18, eta: float = 0.0, **kwargs) -> None:
        super().__init__(steps, **kwargs)
        if not 0 <= eta <= 1:
            raise ValueError(f"sampler ddim: eta={eta} must be in [0, 1]")
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            eps_hat = eps_from_x(z, x_hat, lv.alpha[i], lv.sigma[i])
            a_s, s_s = lv.alpha[i + 1], lv.sigma[i + 1]
            var_eta = self.eta**2 * s_s**2 * -torch.expm1(lv.logsnr[i] - lv.logsnr[i + 1])
            z = a_s * x_hat + torch.sqrt(s_s**2 - var_eta) * eps_hat
            if self.eta > 0 and s_s > 0:
                z = z + torch.sqrt(var_eta) * noise()
        return z


class DDPM(Sampler):
    """Ancestral sampling from the posterior q(z_s | z_t, x = x̂) (Ho et al. 2020; Kingma et al.
    2021, Eq. 33): with c = 1 − e^{λ_t − λ_s},
    z_s = (α_t σ_s²)/(α_s σ_t²) z_t + α_s c x̂ + σ_s √c ξ."""

    name = "ddpm"

    @property
    def stochastic(self) -> bool:
        return True

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            a_t, s_t, a_s, s_s = lv.alpha[i], lv.sigma[i], lv.alpha[i + 1], lv.sigma[i + 1]
            c = -torch.expm1(lv.logsnr[i] - lv.logsnr[i + 1])
            z = (a_t * s_s**2) / (a_s * s_t**2) * z + a_s * c * x_hat
            if s_s > 0:
                z = z + s_s * torch.sqrt(c) * noise()
        return z


class Euler(Sampler):
    """Euler on the probability-flow ODE in z (Song et al. 2021, Eq. 13):
    dz/dt = f_t z + g_t²/(2σ_t) ε̂ = α̇_t x̂ + σ̇_t ε̂, z_s = z_t + (s − t)(α̇_t x̂ + σ̇_t ε̂).
    Not invariant to scaling the schedule (the blog's contrast to DDIM)."""

    name = "euler"

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            u = pf_velocity(z, x_hat, lv.alpha[i], lv.sigma[i], lv.d_alpha[i], lv.d_sigma[i])
            z = z + (lv.t[i + 1] - lv.t[i]) * u
        return z


class EDMSampler(Sampler):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): Heun on dz̃/dσ̃ = ε̂ with churn.
    γ_i = min(S_churn/N, √2 − 1) where S_tmin ≤ σ̃_i ≤ S_tmax; σ̂ = σ̃_i (1 + γ_i),
    z̃ ← z̃ + √(σ̂² − σ̃_i²) S_noise ξ; Euler step to σ̃_{i+1} (= DDIM), then the trapezoid correction
    unless σ̃_{i+1} = 0. A step from σ̃ = ∞ (α = 0) stays an Euler step: its correction is infinite."""

    name = "edm"

    def __init__(
        self,
        steps: int = 18,
        S_churn: float = 0.0,
        S_tmin: float = 0.0,
        S_tmax: float = math.inf,
        S_noise: float = 1.0,
        grid: str = "edm",
        **kwargs,
    ) -> None:
        super().__init__(steps, grid=grid, **kwargs)
        if S_churn < 0 or S_noise < 0:
            raise ValueError(f"sampler edm: S_churn={S_churn} and S_noise={S_noise} must be >= 0")
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = float(S_churn), S_tmin, S_tmax, float(S_noise)

    @property
    def stochastic(self) -> bool:
        return self.S_churn > 0

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        """Alg. 2 in EDM's symbols: noise levels t_i = σ̃_i, states x_i = z̃_i, D(x; t) the x̂ there."""
        N = len(lv.t) - 1
        t_steps = lv.sigma / lv.alpha  # t_0 = ∞ where α_0 = 0; t_N = 0 on a grid that ends at data

        def D(x: Tensor, t: Tensor, i: int | None = None) -> Tensor:
            """D_θ(x; t) by our denoiser at z = α x and our time of σ̃ = t: grid point i, else λ = −2 log t."""
            if i is None:
                time = lv.sched.t_of_logsnr(-2 * torch.log(t))
                return denoise(lv.sched(time).alpha * x, time)
            return denoise(lv.alpha[i] * x, lv.t[i])

        # Line 2: x_0 ~ N(0, t_0² I) arrives as z_0 = σ_0 ε; x_0 = z_0/α_0.
        if torch.isinf(t_steps[0]):
            # α_0 = 0: x_0 = ∞ ε. Lines 7-8 tend to x_1 = D + t_1 ε, the DDIM step; no noise, no correction.
            x, first = denoise(z, lv.t[0]) + t_steps[1] * (z / lv.sigma[0]), 1
        else:
            x, first = z / lv.alpha[0], 0
        for i in range(first, N):  # line 3
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            gamma = min(self.S_churn / N, math.sqrt(2) - 1) if self.S_tmin <= t_cur <= self.S_tmax else 0.0
            t_hat, x_hat = t_cur, x
            if gamma > 0:
                eps = self.S_noise * noise()  # line 4: ε_i ~ N(0, S_noise² I), drawn only where γ_i > 0
                t_hat = t_cur + gamma * t_cur  # line 5: raise the noise level to t̂_i
                x_hat = x + torch.sqrt(t_hat**2 - t_cur**2) * eps  # line 6: add noise from t_i to t̂_i
            denoised = D(x_hat, t_hat, None if gamma > 0 else i)
            d = (x_hat - denoised) / t_hat  # line 7: dx/dt at t̂_i
            # Line 8, x̂_i + (t_{i+1} − t̂_i) d_i, written D + t_{i+1} d_i (the DDIM step): equal, and exact
            # at t_{i+1} = 0 where the literal form cancels two terms of size x̂_i in float32.
            x_next = denoised + t_next * d
            if t_next != 0:  # line 9
                d_prime = (x_next - D(x_next, t_next, i + 1)) / t_next  # line 10: dx/dt at t_{i+1}
                # Line 11, x̂_i + (t_{i+1} − t̂_i)(½ d_i + ½ d'_i), as line 8's point plus the correction.
                x_next = x_next + 0.5 * (t_next - t_hat) * (d_prime - d)
            x = x_next
        return lv.alpha[N] * x  # line 14: z_N = α_N x_N


class Heun(EDMSampler):
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Alg. 1): ``edm`` with S_churn = 0.
    NFE = 2N − 1 on a grid ending at σ = 0."""

    name = "heun"

    def __init__(self, steps: int = 18, grid: str = "edm", **kwargs) -> None:
        super().__init__(steps, S_churn=0.0, grid=grid, **kwargs)


def _phi(k: int, h: Tensor) -> Tensor:
    """φ_k(−h) (Hochbruck & Ostermann 2010): φ_1(x) = (e^x − 1)/x, φ_{k+1}(x) = (φ_k(x) − 1/k!)/x. With
    them the exact step in the half log-SNR h (Lu et al. 2022, DPM-Solver++ Eq. 9, x̂ expanded in λ/2) is
    z_s = (σ_s/σ_t) z_t + α_s Σ_k h^{k+1} φ_{k+1}(−h) x̂^{(k)}(λ_t/2)."""
    phi = -torch.expm1(-h) / h
    for j in range(1, k):
        phi = (phi - 1 / math.factorial(j)) / -h
    return phi


def _multistep_order(order: int, i: int, known: int, lv: Levels) -> int:
    """The order of step i of an N-step multistep method: at most ``order``, at most the ``known`` data
    predictions at finite λ (warm-up: 1, 2, …), first order on a step of infinite h (from α = 0 or to
    σ = 0), and on a grid that ends at σ = 0 at most N − i (orders fall to 1 at the last step, as in
    DPM-Solver's and UniPC's ``lower_order_final``; a grid that ends at σ > 0 keeps its order)."""
    h = lv.logsnr[i + 1] - lv.logsnr[i]
    if not torch.isfinite(h):
        return 1
    p = min(order, max(known, 1))
    return min(p, len(lv.t) - 1 - i) if lv.sigma[-1] == 0 else p


LOW_NFE_SHIFT = 2.0


def _low_nfe_shift(grid: str, shift: float | None) -> float:
    """The multistep solvers' default ``shift``: 2 on ``uniform_t``, 1 on the other grids. At NFE 5 and
    10 on both oracle mixtures of ``scripts/bench_samplers.py`` (README, "Sampler accuracy"), uniform-t
    shifted by 2 was the best grid, or within 10 % of it, for DPM-Solver++(2M), (3M) and UniPC, where
    the EDM grid lost to DDIM at NFE ≤ 8."""
    if shift is not None:
        return shift
    return LOW_NFE_SHIFT if grid == "uniform_t" else 1.0


class DPMSolverPP2MSDE(Sampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, DPM-Solver++ §5 SDE form; k-diffusion ``sample_dpmpp_2m_sde``),
    data prediction in the half log-SNR h = (λ_s − λ_t)/2, noise fraction η, H = (1 + η) h:
    z_s = (σ_s/σ_t) e^{−ηh} z_t + α_s (1 − e^{−H}) x̂_i + α_s c_H D_1 + σ_s √(1 − e^{−2ηh}) ξ,
    D_1 = (x̂_i − x̂_{i−1})/r, r = h_{i−1}/h, c_H = ½ (1 − e^{−H}) (``midpoint``) or H φ_2(−H) (``heun``).
    η = 1 is the reverse SDE (its first-order step is the DDPM posterior step), η = 0 the
    probability-flow ODE (DPM-Solver++(2M)). First order on the first step and on the final step to
    σ = 0, which adds no noise and returns α_s x̂."""

    name = "dpmpp_2m_sde"
    SOLVER_TYPES = ("midpoint", "heun")

    def __init__(
        self,
        steps: int = 18,
        eta: float = 1.0,
        solver_type: str = "midpoint",
        grid: str = "uniform_t",
        shift: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(steps, grid=grid, shift=_low_nfe_shift(grid, shift), **kwargs)
        if eta < 0:
            raise ValueError(f"sampler {self.name}: eta={eta} must be >= 0")
        if solver_type not in self.SOLVER_TYPES:
            allowed = list(self.SOLVER_TYPES)
            raise ValueError(
                f"sampler {self.name}: solver_type={solver_type!r} is unknown; allowed: {allowed}"
            )
        self.eta, self.solver_type = float(eta), solver_type

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        x_prev, h_prev = None, math.inf
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            a_s, s_s = lv.alpha[i + 1], lv.sigma[i + 1]
            if s_s == 0:  # the final step to data: x̂, no noise
                z = a_s * x_hat
                continue
            h = 0.5 * (lv.logsnr[i + 1] - lv.logsnr[i])
            H = (1 + self.eta) * h
            decay = torch.exp(-self.eta * h) if self.eta > 0 else 1.0  # e^{−ηh}; 1 at η = 0 even where h = ∞
            z = (s_s / lv.sigma[i]) * decay * z - a_s * torch.expm1(-H) * x_hat
            if x_prev is not None and math.isfinite(h_prev) and torch.isfinite(h):
                d1 = (x_hat - x_prev) * (h / h_prev)
                c = -0.5 * torch.expm1(-H) if self.solver_type == "midpoint" else H * _phi(2, H)
                z = z + a_s * c * d1
            if self.eta > 0:
                z = z + s_s * torch.sqrt(-torch.expm1(-2 * self.eta * h)) * noise()
            x_prev, h_prev = x_hat, float(h)
        return z


class DPMSolverPP2M(DPMSolverPP2MSDE):
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, Alg. 2; math.md §5): the η = 0 case of
    ``dpmpp_2m_sde``, z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) D with D = (1 + 1/(2r)) x̂_i − x̂_{i−1}/(2r),
    r = h_{i−1}/h_i (``midpoint``); first order (= DDIM) on the first step and on the final step to σ = 0.
    Default grid: uniform-t shifted by 2 (``_low_nfe_shift``)."""

    name = "dpmpp_2m"

    def __init__(self, steps: int = 18, solver_type: str = "midpoint", **kwargs) -> None:
        super().__init__(steps, eta=0.0, solver_type=solver_type, **kwargs)


class DPMSolverPP3M(Sampler):
    """DPM-Solver++(3M), data prediction (Lu et al. 2022; the multistep third-order update of their code,
    diffusers ``multistep_dpm_solver_third_order_update``), in the half log-SNR h = (λ_s − λ_t)/2 with
    r_0 = h_{i−1}/h, r_1 = h_{i−2}/h, D_{1,0} = (x̂_i − x̂_{i−1})/r_0, D_{1,1} = (x̂_{i−1} − x̂_{i−2})/r_1:
    D_1 = D_{1,0} + r_0 (D_{1,0} − D_{1,1})/(r_0 + r_1) ≈ h x̂′, D_2 = (D_{1,0} − D_{1,1})/(r_0 + r_1)
    ≈ h²x̂″/2,
    z_s = (σ_s/σ_t) z_t + α_s [h φ_1(−h) x̂_i + h φ_2(−h) D_1 + c_2 D_2] (``_phi``'s exact step, term by term).
    ``variant="taylor"``: c_2 = 2h φ_3(−h), the exact step's coefficient, third order. ``variant="lu"``:
    c_2 = h φ_3(−h) as in Lu et al.'s code, diffusers and k-diffusion (``sample_dpmpp_3m_sde``, η = 0),
    whose x̂″ term is half the exact one, so it converges at second order. Orders by
    ``_multistep_order``; the order-2 step is ``dpmpp_2m``'s."""

    name = "dpmpp_3m"
    VARIANTS = ("taylor", "lu")

    def __init__(
        self,
        steps: int = 18,
        variant: str = "taylor",
        grid: str = "uniform_t",
        shift: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(steps, grid=grid, shift=_low_nfe_shift(grid, shift), **kwargs)
        if variant not in self.VARIANTS:
            raise ValueError(
                f"sampler {self.name}: variant={variant!r} is unknown; allowed: {list(self.VARIANTS)}"
            )
        self.variant = variant

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        xs: list[Tensor] = []  # x̂ at the grid points of finite λ, newest last
        hs: list[Tensor] = []  # the steps between them
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            if torch.isfinite(lv.logsnr[i]):
                xs, hs = [*xs[-2:], x_hat], [*hs[-1:], lv.logsnr[i] - lv.logsnr[i - 1]] if xs else []
            h = 0.5 * (lv.logsnr[i + 1] - lv.logsnr[i])
            p = _multistep_order(3, i, len(xs), lv)
            d = -torch.expm1(-h) * x_hat  # h φ_1(−h) x̂_i
            if p >= 2:
                r0 = 0.5 * hs[-1] / h
                d1_0 = (xs[-1] - xs[-2]) / r0
                if p == 2:
                    d = d + 0.5 * -torch.expm1(-h) * d1_0
                else:
                    r1 = 0.5 * hs[-2] / h
                    d1_1 = (xs[-2] - xs[-3]) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    c2 = (2 if self.variant == "taylor" else 1) * h * _phi(3, h)
                    d = d + h * _phi(2, h) * d1 + c2 * d2
            z = (lv.sigma[i + 1] / lv.sigma[i]) * z + lv.alpha[i + 1] * d
        return z


class UniPC(Sampler):
    """UniPC (Zhao et al. 2023), data prediction, multistep, in the half log-SNR h = (λ_s − λ_t)/2.

    Predictor UniP-p (Alg. 1 / Eq. 8 with x̂ for the model output): from the p − 1 previous points m,
    r_m = (λ_m − λ_t)/(2h) and D_m = x̂_m − x̂_t,
        z_s = (σ_s/σ_t) z_t + α_s h φ_1(−h) x̂_t + α_s B(h) Σ_m a_m D_m/r_m,
    with a solving Σ_m a_m r_m^{k−1} = k! h φ_{k+1}(−h)/B(h), k = 1 … p − 1 (the order conditions of
    Thm. 3.1: the sum matches Σ_k h^{k+1} φ_{k+1}(−h) x̂^{(k)} of the exact step up to O(h^{p+1})).
    Corrector UniC-p (Eq. 7): the same update of the same step t → s, recomputed with one more point,
    the model's x̂ at the predicted z_s (r = 1), and p conditions; order p + 1 (Thm. 3.2). That x̂_s is
    the next step's x̂_t, so the corrector costs no evaluation: NFE = steps; no correction follows the
    last step. A single difference uses a = ½ (UniP-2, UniC-1: the authors' choice, exact as h → 0).
    ``variant``: B(h) = h (``bh1``) or 1 − e^{−h} (``bh2``), the paper's B(h) = h and e^h − 1 at the
    data-prediction step −h with the update's sign. Orders by ``_multistep_order`` (warm-up at the start,
    falling to 1 at the final step to σ = 0). Defaults: UniPC-2 with B₂ (at NFE 5 and 10 on the oracle
    within 10 % of UniPC-3 and of B₁, which diverges on the EDM grid), uniform-t shifted by 2."""

    name = "unipc"
    VARIANTS = ("bh1", "bh2")

    def __init__(
        self,
        steps: int = 18,
        order: int = 2,
        variant: str = "bh2",
        corrector: bool = True,
        grid: str = "uniform_t",
        shift: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(steps, grid=grid, shift=_low_nfe_shift(grid, shift), **kwargs)
        if order not in (1, 2, 3):
            raise ValueError(f"sampler {self.name}: order={order} must be 1, 2 or 3")
        if variant not in self.VARIANTS:
            raise ValueError(
                f"sampler {self.name}: variant={variant!r} is unknown; allowed: {list(self.VARIANTS)}"
            )
        self.order, self.variant, self.corrector = order, variant, bool(corrector)

    def _update(
        self, lv: Levels, i: int, z: Tensor, x_hat: Tensor, points: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """z_s for the step i → i + 1 from z_t = ``z``, x̂_t and ``points`` (x̂_m, λ_m): UniP's or UniC's."""
        h = 0.5 * (lv.logsnr[i + 1] - lv.logsnr[i])
        z_s = (lv.sigma[i + 1] / lv.sigma[i]) * z - lv.alpha[i + 1] * torch.expm1(-h) * x_hat
        if not points:
            return z_s
        B = h if self.variant == "bh1" else -torch.expm1(-h)
        r = torch.stack([0.5 * (lam - lv.logsnr[i]) / h for _, lam in points])
        if len(points) == 1:
            a = torch.full_like(r, 0.5)
        else:
            orders = range(1, len(points) + 1)
            b = torch.stack([math.factorial(k) * h * _phi(k + 1, h) / B for k in orders])
            a = torch.linalg.solve(torch.stack([r ** (k - 1) for k in orders]), b)
        d = sum(a_m * (x_m - x_hat) / r_m for a_m, r_m, (x_m, _) in zip(a, r, points, strict=True))
        return z_s + lv.alpha[i + 1] * B * d

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        known: list[tuple[Tensor, Tensor]] = []  # (x̂, λ) at the grid points of finite λ, newest last
        last = None  # (z_t, x̂_t, previous points, step) of the last predictor, for the corrector
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            if self.corrector and last is not None:
                z_t, x_t, prev, j = last  # UniC on step j = i − 1, with x̂ at its predicted end
                z = self._update(lv, j, z_t, x_t, [*prev, (x_hat, lv.logsnr[i])])
            if torch.isfinite(lv.logsnr[i]):
                known = [*known, (x_hat, lv.logsnr[i])][-self.order :]
            p = _multistep_order(self.order, i, len(known), lv)
            prev = known[-p:-1]
            last = (z, x_hat, prev, i) if torch.isfinite(lv.logsnr[i + 1] - lv.logsnr[i]) else None
            z = self._update(lv, i, z, x_hat, prev)
        return z


class SDE(Sampler):
    """Euler–Maruyama on the reverse SDE (the blog, "SDE and flow"; Song et al. 2021, Eq. 6):
    dz = [α̇ x̂ + σ̇ ε̂ + (η_t²/2) g_t² ε̂/σ_t] dt + η_t g_t dW̄, g_t² = −σ_t² λ'_t. η = 0 is the
    probability-flow ODE, η = 1 the reverse diffusion. ``diffusion`` sets the stochastic-interpolant
    ε_t = η_t g_t directly instead. g_t is infinite at the noise end of the cosine and flow schedules:
    start below it (``t_max`` < 1). The last step to σ = 0 returns x̂ (no noise added)."""

    name = "sde"

    def __init__(self, steps: int = 100, eta: float = 1.0, diffusion: float | None = None, **kwargs) -> None:
        super().__init__(steps, **kwargs)
        if eta < 0 or (diffusion is not None and diffusion < 0):
            raise ValueError(f"sampler sde: eta={eta} and diffusion={diffusion} must be >= 0")
        self.eta, self.diffusion = float(eta), diffusion

    @property
    def stochastic(self) -> bool:
        return (self.eta if self.diffusion is None else self.diffusion) > 0

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            if lv.sigma[i + 1] == 0:
                z = lv.alpha[i + 1] * x_hat
                continue
            a, s = lv.alpha[i], lv.sigma[i]
            eps_hat = eps_from_x(z, x_hat, a, s)
            dlogsnr = 2 * (lv.d_alpha[i] / a - lv.d_sigma[i] / s)
            g2 = -(s**2) * dlogsnr
            eta2 = self.eta**2 if self.diffusion is None else self.diffusion**2 / g2
            dt = lv.t[i + 1] - lv.t[i]
            drift = lv.d_alpha[i] * x_hat + lv.d_sigma[i] * eps_hat + 0.5 * eta2 * g2 * eps_hat / s
            z = z + dt * drift + torch.sqrt(eta2 * g2 * -dt) * noise()
        return z


class Churn(Sampler):
    """The blog's churn ("DDPM = DDIM + renoising"): from λ_t aiming at λ_s, a DDIM step to
    λ_u = λ_t + (λ_s − λ_t)/(1 − c), then forward renoising to λ_s:
    z_s = (α_s/α_u) z_u + √(σ_s² − (α_s σ_u/α_u)²) ξ. c = 0 is DDIM, c = ½ has DDPM's law."""

    name = "churn"

    def __init__(self, steps: int = 18, churn: float = 0.5, **kwargs) -> None:
        super().__init__(steps, **kwargs)
        if not 0 <= churn < 1:
            raise ValueError(f"sampler churn: churn={churn} must be in [0, 1)")
        self.churn = float(churn)

    @property
    def stochastic(self) -> bool:
        return self.churn > 0

    def run(self, denoise: Denoiser, z: Tensor, lv: Levels, noise: Callable[[], Tensor]) -> Tensor:
        sched = lv.sched
        for i in range(len(lv.t) - 1):
            x_hat = denoise(z, lv.t[i])
            eps_hat = eps_from_x(z, x_hat, lv.alpha[i], lv.sigma[i])
            a_s, s_s = lv.alpha[i + 1], lv.sigma[i + 1]
            if s_s == 0 or self.churn == 0:
                z = a_s * x_hat + s_s * eps_hat
                continue
            lam_s = lv.logsnr[i + 1]
            lam_u = lam_s + self.churn / (1 - self.churn) * (lam_s - lv.logsnr[i])
            o = sched(sched.t_of_logsnr(lam_u))
            z_u = o.alpha * x_hat + o.sigma * eps_hat
            ratio = a_s / o.alpha
            z = ratio * z_u + torch.sqrt(s_s**2 - (ratio * o.sigma) ** 2) * noise()
        return z


SAMPLERS: Registry[Sampler] = Registry(
    "sampler",
    DDIM,
    DDPM,
    Euler,
    Heun,
    EDMSampler,
    DPMSolverPP2M,
    DPMSolverPP2MSDE,
    DPMSolverPP3M,
    UniPC,
    SDE,
    Churn,
)
build = SAMPLERS.build
