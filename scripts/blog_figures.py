"""The figures of the blog "Diffusion Meets Flow Matching" (Gao et al. 2024), from the exact oracle.

    python scripts/blog_figures.py --out DIR [--tiny]

writes five PNGs and ``figures.json``, the numbers behind every curve:

1. ``weightings.png``     w(λ) of the common losses, each normalised to max 1 on λ ∈ [−10, 10]
                          (the blog's "Weighting functions" figure; math.md §1.4).
2. ``ddim_vs_euler.png``  DDIM and probability-flow Euler under scaled flow schedules: DDIM's paths
                          coincide, Euler's do not ("DDIM is invariant to scaling"; math.md §1.1).
3. ``flow_curvature.png`` deterministic paths under the flow and VP scalings for narrow and wide
                          data ("VP better for wide data distributions, FM for narrow ones").
4. ``ddpm_vs_ddim.png``   DDIM, DDPM and churn ½ (DDPM = DDIM + renoising; math.md §1.5).
5. ``weights_h.png``      the weights h of the v-predictions in the final sample (math.md §1.5).

Every figure is a function that saves its PNG and returns its data; ``--tiny`` shrinks point counts
and steps of the sampled figures (the weighting curves keep the blog's 1000 points).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from diffusionflow.core import oracle, predictions, samplers, schedules, weightings
from diffusionflow.core.samplers import Levels

FigureData = dict[str, object]


# ---- data ---------------------------------------------------------------------------------------
def mixture_2d() -> oracle.GaussianMixture:
    """The 2-D mixture of the figures and of ``bench_samplers``: four components of different
    spreads and shapes (a tight blob, an elongated one, a medium and a wide one), unequal weights."""
    means = torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0], [0.0, 0.0]])
    covariances = torch.tensor(
        [
            [[0.04, 0.0], [0.0, 0.04]],
            [[0.5, 0.3], [0.3, 0.3]],
            [[0.2, 0.0], [0.0, 0.2]],
            [[1.0, -0.2], [-0.2, 0.6]],
        ]
    )
    return oracle.GaussianMixture(means, covariances, torch.tensor([0.3, 0.25, 0.25, 0.2]))


def mixture_1d() -> oracle.GaussianMixture:
    """A 1-D mixture of three components of different widths (overall std ≈ 1.2)."""
    means = torch.tensor([[-1.5], [0.2], [1.6]])
    stds = torch.tensor([0.2, 0.4, 0.15])
    return oracle.GaussianMixture(means, stds[:, None, None] ** 2, torch.tensor([0.3, 0.4, 0.3]))


def two_gaussians_1d(std: float) -> oracle.GaussianMixture:
    """Two equal Gaussians at ±0.8 std with component std 0.6 std: overall standard deviation ``std``."""
    means = torch.tensor([[-0.8 * std], [0.8 * std]])
    return oracle.GaussianMixture(means, torch.full((2, 1, 1), (0.6 * std) ** 2))


def oracle_denoiser(gmm: oracle.GaussianMixture, sched: schedules.Schedule) -> samplers.Denoiser:
    """The exact x̂(z, t) = E[x | z_t = z] under ``sched``."""
    return lambda z, t: gmm.x_hat(z, t, sched)


# ---- helpers ------------------------------------------------------------------------------------
def sample_path(
    sampler: samplers.Sampler,
    denoise: samplers.Denoiser,
    noise: Tensor,
    sched: schedules.Schedule,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run a one-evaluation-per-step sampler and return (x, t, path): the final sample, the grid
    (N + 1,) and z at every grid point (N + 1, n, D), read off the denoiser's inputs."""
    seen: list[Tensor] = []

    def recording(z: Tensor, t: Tensor) -> Tensor:
        seen.append(z.clone())
        return denoise(z, t)

    x = sampler(recording, noise, sched, generator=generator)
    t = sampler.times(sched)
    if len(seen) != len(t) - 1:
        raise ValueError(f"sample_path needs one denoiser call per step; {sampler!r} made {len(seen)}")
    return x, t, torch.stack([*seen, sched(t[-1]).alpha * x])


def power_scale(p: float) -> Callable[[Tensor], Tensor]:
    """c_t = ((1 − t)² + t²)^(−p/2): p = 0 keeps the flow schedule, p = 1 makes it variance preserving."""
    return lambda t: ((1 - t) ** 2 + t**2) ** (-p / 2)


def bend(t: Tensor, path: Tensor) -> float:
    """How far paths stray from straight: max over t of the RMS (over samples) distance of z_t from
    the chord between its ends, divided by the RMS end-to-end distance; 0 for straight paths.

    (The ratio of path length to end-to-end distance cannot see curvature in 1-D, where any
    monotone path has ratio 1; Liu et al.'s velocity-variance "straightness" divides by the
    end-to-end distance squared, which vanishes when data and noise have the same spread.)"""
    frac = ((t - t[0]) / (t[-1] - t[0]))[:, None, None]
    chord = path[0] + frac * (path[-1] - path[0])
    off = ((path - chord) ** 2).sum(-1).mean(-1).sqrt().max()
    return float(off / ((path[-1] - path[0]) ** 2).sum(-1).mean().sqrt())


@contextmanager
def oracle_precision() -> Iterator[None]:
    """float64 as torch's default dtype and one intra-op thread, both restored on exit. The oracle's
    work is many small batched matrix operations, where more threads only add overhead (several
    times slower on a shared 2-core machine)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def new_figure(ncols: int, nrows: int = 1, size: float = 4.0) -> tuple[Figure, list]:
    """A matplotlib figure without pyplot (no global backend state) and its flat list of axes."""
    fig = Figure(figsize=(size * ncols, 0.8 * size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


# ---- 1. weightings ------------------------------------------------------------------------------
WEIGHTING_CURVES: dict[str, tuple[str, dict[str, float]]] = {
    "EDM": ("edm", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
    "SD3": ("sd3", {"m": 0.0, "s": 1.0}),
    "flow": ("flow", {}),
    "v (cosine)": ("cosine_v", {}),
    "sigmoid": ("sigmoid", {"b": 0.0}),
    "ELBO": ("elbo", {}),
    "IDDPM (ε, cosine)": ("iddpm", {}),
    "min-SNR-5": ("min_snr", {"gamma": 5.0}),
}
"""Label → (weighting name, options). "flow" and "v (cosine)" coincide after normalising: the
blog's "v-pred and FM" trace."""


def figure_weightings(out: Path, points: int = 1000) -> FigureData:
    """w(λ) on λ ∈ [−10, 10], each divided by its maximum there (the blog's figure; math.md §1.4)."""
    logsnr = torch.linspace(-10.0, 10.0, points)
    curves = {}
    for label, (name, options) in WEIGHTING_CURVES.items():
        w = weightings.build(name, **options)(logsnr)
        curves[label] = w / w.max()
    fig, (ax,) = new_figure(1, size=6.0)
    for label, w in curves.items():
        ax.plot(logsnr, w, label=label, ls="--" if label == "v (cosine)" else "-")
    ax.set(xlabel="log-SNR λ", ylabel="w(λ) / max w", title="Weighting functions (normalised)")
    ax.legend(fontsize=8)
    fig.savefig(out / "weightings.png", dpi=100)
    return {"logsnr": logsnr.tolist(), "curves": {k: v.tolist() for k, v in curves.items()}}


# ---- 2. DDIM vs Euler under scaling -------------------------------------------------------------
def figure_ddim_vs_euler(
    out: Path, steps: int = 10, n: int = 256, shown: int = 12, powers: Sequence[float] = (0.0, 0.5, 1.0)
) -> FigureData:
    """The same noise through DDIM and PF-ODE Euler on the flow schedule scaled by c_t
    (``power_scale``), paths drawn as z_t (top) and as z_t / c_t, the flow-schedule variable
    (bottom). DDIM's final samples and z_t / c_t paths coincide for every c_t (the blog, "DDIM is
    invariant to a linear scaling applied to the noise schedule"); Euler's do not."""
    gmm = mixture_1d()
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    names = ("ddim", "euler")
    final: dict[str, list[list[float]]] = {name: [] for name in names}
    fig, axes = new_figure(len(names), 2)
    for k, p in enumerate(powers):
        scale = power_scale(p)
        sched = schedules.build("flow", scale=scale)
        for col, name in enumerate(names):
            x, t, path = sample_path(
                samplers.build(name, steps=steps), oracle_denoiser(gmm, sched), noise, sched
            )
            final[name].append(x[:, 0].tolist())
            for row, z in enumerate((path, path / scale(t)[:, None, None])):
                lines = axes[row * len(names) + col].plot(t, z[:, :shown, 0], color=f"C{k}", lw=1)
                lines[0].set_label(f"p = {p:g}")
    for col, name in enumerate(names):
        for row, ylabel in enumerate(("z_t", "z_t / c_t")):
            ax = axes[row * len(names) + col]
            ax.set(xlabel="t", ylabel=ylabel, title=f"{name}, {steps} steps, c_t = ((1−t)²+t²)^(−p/2)")
            ax.invert_xaxis()
            ax.legend(fontsize=8)
    fig.savefig(out / "ddim_vs_euler.png", dpi=100)
    return {"powers": list(powers), "steps": steps, "final": final}


# ---- 3. path curvature vs data width ------------------------------------------------------------
def figure_flow_curvature(
    out: Path,
    steps: int = 200,
    n: int = 200,
    shown: int = 20,
    stds: Sequence[float] = (0.1, 3.0),
    euler_steps: int = 8,
) -> FigureData:
    """Exact-ODE (fine DDIM) paths of narrow and wide 1-D data under the flow schedule and its VP
    scaling (same noise, hence the same end points), with their ``bend`` and the error of
    ``euler_steps`` steps of PF-ODE Euler in z against the path's end: flow paths are straighter for
    narrow data, VP paths for wide data (the blog, "Sampling": "the variance preserving schedule is
    better (straighter paths) for wide distributions, while the flow matching schedule works better
    for narrow distributions")."""
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    scalings = {"flow": None, "vp": "vp"}
    bends: dict[str, list[float]] = {name: [] for name in scalings}
    errors: dict[str, list[float]] = {name: [] for name in scalings}
    fig, axes = new_figure(len(stds), len(scalings))
    for row, (name, scale) in enumerate(scalings.items()):
        sched = schedules.build("flow", scale=scale)
        for col, std in enumerate(stds):
            denoise = oracle_denoiser(two_gaussians_1d(std), sched)
            x, t, path = sample_path(samplers.build("ddim", steps=steps), denoise, noise, sched)
            x_euler = samplers.build("euler", steps=euler_steps)(denoise, noise, sched)
            bends[name].append(bend(t, path))
            errors[name].append(float((x_euler - x).pow(2).mean().sqrt()))
            ax = axes[row * len(stds) + col]
            ax.plot(t, path[:, :shown, 0], color="C0", lw=0.8)
            ax.set(
                xlabel="t",
                ylabel="z_t",
                title=f"{name}, data std {std:g}\nbend {bends[name][-1]:.3f}, "
                f"{euler_steps}-step Euler error {errors[name][-1]:.3f}",
            )
            ax.invert_xaxis()
    fig.savefig(out / "flow_curvature.png", dpi=100)
    return {
        "stds": list(stds),
        "steps": steps,
        "bend": bends,
        "euler_steps": euler_steps,
        "euler_error": errors,
    }


# ---- 4. DDPM vs DDIM ----------------------------------------------------------------------------
STOCHASTIC_VS_DDIM: dict[str, tuple[str, dict[str, float]]] = {
    "ddim": ("ddim", {}),
    "ddpm": ("ddpm", {}),
    "churn 0.5": ("churn", {"churn": 0.5}),
}


def figure_ddpm_vs_ddim(out: Path, steps: int = 100, n: int = 500, shown: int = 4) -> FigureData:
    """The same noise through DDIM, DDPM and churn ½ on the cosine schedule over the 2-D mixture's
    density. "DDPM = DDIM + renoising" (the blog, "Deterministic vs stochastic samplers"; math.md
    §1.5): a DDPM step to λ_t + Δλ is a DDIM step to λ_t + 2Δλ and forward renoising, and with the
    same Gaussian draws the last two panels coincide path by path. Records each sampler's mean
    log p_data of its samples, beside that of exact samples."""
    gmm = mixture_2d()
    sched = schedules.build("cosine")
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
    grid = torch.linspace(-4.0, 4.0, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = gmm.log_prob_data(torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)).reshape(gx.shape)
    levels = torch.linspace(float(density.max()) - 6, float(density.max()), 7).tolist()
    exact = gmm.sample(n, torch.Generator().manual_seed(3))
    log_p = {"exact": float(gmm.log_prob_data(exact).mean())}
    fig, axes = new_figure(len(STOCHASTIC_VS_DDIM))
    for ax, (label, (name, options)) in zip(axes, STOCHASTIC_VS_DDIM.items(), strict=True):
        sampler = samplers.build(name, steps=steps, **options)
        generator = torch.Generator().manual_seed(4)
        x, _, path = sample_path(sampler, oracle_denoiser(gmm, sched), noise, sched, generator)
        log_p[label] = float(gmm.log_prob_data(x).mean())
        ax.contour(gx, gy, density, levels=levels, colors="0.7", linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=2, color="C0", alpha=0.5)
        ax.plot(path[:, :shown, 0], path[:, :shown, 1], color="C3", lw=0.8)
        ax.set(
            title=f"{label}, {steps} steps\nmean log p_data {log_p[label]:.3f} (exact {log_p['exact']:.3f})",
            xlim=(-4, 4),
            ylim=(-4, 4),
        )
    fig.savefig(out / "ddpm_vs_ddim.png", dpi=100)
    return {"steps": steps, "mean_log_prob": log_p}


# ---- 5. weights of the predictions in the final sample ------------------------------------------
StepMean = Callable[[Levels, int], tuple[Tensor, Tensor]]
"""Step i of a sampler's mean as (a, b): z_{i+1} = a z_i + b x̂_i (+ independent noise)."""


def _ddim_coefficients(a_t: Tensor, s_t: Tensor, a_s: Tensor, s_s: Tensor) -> tuple[Tensor, Tensor]:
    """DDIM (``samplers.DDIM``, η = 0): z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t."""
    a = s_s / s_t
    return a, a_s - a * a_t


def ddim_step(lv: Levels, i: int) -> tuple[Tensor, Tensor]:
    """``samplers.DDIM`` with η = 0."""
    return _ddim_coefficients(lv.alpha[i], lv.sigma[i], lv.alpha[i + 1], lv.sigma[i + 1])


def ddpm_step(lv: Levels, i: int) -> tuple[Tensor, Tensor]:
    """``samplers.DDPM``'s mean: z_s = α_t σ_s²/(α_s σ_t²) z_t + α_s c x̂, c = 1 − e^{λ_t − λ_s}."""
    a_t, s_t, a_s, s_s = lv.alpha[i], lv.sigma[i], lv.alpha[i + 1], lv.sigma[i + 1]
    c = -torch.expm1(lv.logsnr[i] - lv.logsnr[i + 1])
    return a_t * s_s**2 / (a_s * s_t**2), a_s * c


def churn_step(churn: float) -> StepMean:
    """``samplers.Churn``'s mean: DDIM to λ_u = λ_s + c/(1 − c)(λ_s − λ_t), times α_s/α_u
    (the renoising adds only noise); a plain DDIM step onto σ_s = 0."""

    def step(lv: Levels, i: int) -> tuple[Tensor, Tensor]:
        if lv.sigma[i + 1] == 0:
            return ddim_step(lv, i)
        lam_u = lv.logsnr[i + 1] + churn / (1 - churn) * (lv.logsnr[i + 1] - lv.logsnr[i])
        o = lv.sched(lv.sched.t_of_logsnr(lam_u))
        a, b = _ddim_coefficients(lv.alpha[i], lv.sigma[i], o.alpha, o.sigma)
        ratio = lv.alpha[i + 1] / o.alpha
        return ratio * a, ratio * b

    return step


def prediction_weights(step: StepMean, sched: schedules.Schedule, steps: int) -> tuple[Tensor, Tensor]:
    """(t_i, h_i): the final sample x = z_N/α_N is linear in the v-predictions v̂_0 … v̂_{N−1}
    (and in the noise); h_i is the coefficient of −v̂_i, the direction the sampler moves along
    (on the cosine schedule dz/dφ = v). Propagated through the step means with
    x̂_i = p_i z_i + q_i v̂_i from ``predictions.V`` (the blog, "churn"; math.md §1.5)."""
    lv = Levels.on(sched, samplers.time_grid(sched, steps))
    v = predictions.V()
    one, zero = torch.ones(()), torch.zeros(())
    h = torch.zeros(steps)
    for i in range(steps):
        a, b = step(lv, i)
        p = v.to_x_eps(zero, one, lv.alpha[i], lv.sigma[i])[0]
        q = v.to_x_eps(one, zero, lv.alpha[i], lv.sigma[i])[0]
        h = (a + b * p) * h
        h[i] = b * q
    return lv.t[:-1], -h / lv.alpha[-1]


def figure_weights_h(
    out: Path, steps: int = 100, churns: Sequence[float] = (0.1, 0.2, 0.3, 0.4)
) -> FigureData:
    """h_t for DDIM, DDPM and intermediate churn levels, cosine schedule, v-prediction, ``steps``
    steps (the blog's churn figure): DDIM weighs the predictions equally, h_i = sin δ cos^{N−1−i} δ
    with δ = π/(2N); churn moves the weight to the last predictions."""
    sched = schedules.build("cosine")
    steps_mean: dict[str, StepMean] = {
        "ddim": ddim_step,
        **{f"churn {c:g}": churn_step(c) for c in churns},
        "ddpm": ddpm_step,
    }
    weights = {}
    fig, (ax,) = new_figure(1, size=6.0)
    for label, step in steps_mean.items():
        t, h = prediction_weights(step, sched, steps)
        weights[label] = h.tolist()
        ax.plot(t, h, label=label, lw=2 if label in ("ddim", "ddpm") else 1)
    ax.set(
        xlabel="t of the prediction",
        ylabel="h_t",
        title=f"h_t: weight of −v̂_t in the final sample, {steps} steps",
    )
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.savefig(out / "weights_h.png", dpi=100)
    return {"steps": steps, "t": t.tolist(), "h": weights}


# ---- driver -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Point counts and steps of every figure."""

    euler_n: int = 256
    curvature_steps: int = 200
    curvature_n: int = 200
    ddpm_steps: int = 100
    ddpm_n: int = 500


TINY = Sizes(euler_n=32, curvature_steps=50, curvature_n=40, ddpm_steps=25, ddpm_n=150)


def make_figures(out: Path, sizes: Sizes = Sizes()) -> dict[str, FigureData]:
    """All five figures into ``out``, and their data into ``out/figures.json``."""
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "weightings": figure_weightings(out),
        "ddim_vs_euler": figure_ddim_vs_euler(out, n=sizes.euler_n),
        "flow_curvature": figure_flow_curvature(out, steps=sizes.curvature_steps, n=sizes.curvature_n),
        "ddpm_vs_ddim": figure_ddpm_vs_ddim(out, steps=sizes.ddpm_steps, n=sizes.ddpm_n),
        "weights_h": figure_weights_h(out),
    }
    (out / "figures.json").write_text(json.dumps(data))
    return data


def main(argv: Sequence[str] | None = None) -> dict[str, FigureData]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for the PNGs and figures.json")
    parser.add_argument("--tiny", action="store_true", help="few points and steps (seconds)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with oracle_precision():
        data = make_figures(args.out, TINY if args.tiny else Sizes())
    print(f"wrote {len(data)} figures and figures.json to {args.out} in {time.perf_counter() - start:.1f} s")
    return data


if __name__ == "__main__":
    main()
