"""Likelihoods of a denoiser: the exact one through the probability-flow ODE, and the ELBO.

Conventions as everywhere in ``core``: t = 0 data, t = 1 noise, z_t = α_t x + σ_t ε, λ = log(α²/σ²);
``denoise(z, t) -> x̂`` is the data prediction the samplers use, and ε̂ = (z − α x̂)/σ.

**Probability-flow ODE** (Song et al. 2021, "Score-based generative modeling through SDEs", Eq. 13 and
App. D.2; Chen et al. 2018, "Neural ODEs", instantaneous change of variables, Thm. 1). The ODE

    dz/dt = f(z, t) = α'_t x̂(z, t) + σ'_t ε̂(z, t)                                   (1)

transports p_t to p_s for any s, t (for the exact x̂, f = f_t z − ½ g_t² ∇log p_t, math.md §1.1), and
along its solution d log p_t(z_t)/dt = −∇·f(z_t, t). Integrating from t_min to t_max,

    log p_{t_min}(z_{t_min}) = log p_{t_max}(z_{t_max}) + ∫_{t_min}^{t_max} ∇·f(z_t, t) dt.         (2)

We solve the augmented ODE d/dt [z, Δ] = [f, ∇·f] from [x, 0] at t_min with classical RK4 and add the
prior term log p_{t_max}(z_{t_max}). The divergence is exact (one vector-Jacobian product per
dimension) or the Hutchinson–Skilling estimate vᵀ(∂f/∂z)v with Rademacher probes v, unbiased for
tr ∂f/∂z (Hutchinson 1989; Skilling 1989; FFJORD, Grathwohl et al. 2019, §3.1; Song et al. 2021,
App. D.2). The probes are drawn once and kept along the trajectory, as in FFJORD, so that the integrand
is a smooth function of t; the estimate of (2) stays unbiased because z_t does not depend on them.

**Prior.** p_{t_max} = p_data * N(0, σ²) scaled by α is replaced by N(0, (α² c + σ²) I) at t_max, with
c = ``data_variance`` the per-coordinate second moment E[x_i²] of the data: the isotropic Gaussian
with the second moment of z_{t_max}. It is exact when α_{t_max} = 0 (``flow`` and ``cosine`` at
t = 1, whatever c). Otherwise, for centred data, the error in log p is O(α²_{t_max}(‖z‖² + D)) per
point and O(α⁴_{t_max}) on average (a KL divergence): on ``linear`` at t = 1 (α² = 4.3·10⁻⁵) and the
``blog`` mixture, at most 2·10⁻⁴ nats over 2·10⁵ points, 5·10⁻⁸ on average. A data mean μ ≠ 0 adds a
first-order term α μ·z/σ² per point.

**Time grid.** A fixed grid uniform in φ^{1/ρ}, where φ = arctan(σ/α) = arctan e^{−λ/2} ∈ (0, π/2] is
the VP angle (φ = πt/2 on ``cosine``), like EDM's grid uniform in σ^{1/ρ} (Karras et al. 2022, Eq. 5).
It depends on the schedule only through λ, reaches α = 0 (φ = π/2) in finitely many steps, and
grades the steps towards the data (ρ = 1: uniform angle; ρ → ∞: uniform in log φ, i.e. in λ near the
data). ρ = 3 is the default: on the ``blog`` mixture with the exact denoiser its largest error at
32–64 steps is 10–65× smaller than uniform log φ's, whose steps near the data are wasted where σ is
far below the data's own scales, and as small as uniform t's while still resolving σ ≪ 10⁻³.

**ELBO** (Kingma et al. 2021, "Variational diffusion models", Eq. 17, with its prior and
reconstruction terms written for continuous data and a Gaussian decoder; Kingma & Gao 2023). The bound
depends on the schedule only through λ, and on a scaling of z not at all once the prior and decoder are
written for the same latent, so we state it on the VP form z_vp = z/√(α² + σ²) = α_v x + σ_v ε with
α_v² = sigmoid(λ), σ_v² = sigmoid(−λ) (x̂ and ε̂ are functions of λ and z_vp alone):

    −log p(x) ≤ KL(q(z_vp,λmin | x) ‖ N(0, I)) + E[−log N(x; z_vp/α_v, (σ_v/α_v)² I)]|_{λmax}
                + ½ ∫_{λmin}^{λmax} E_ε ‖ε − ε̂(z_λ)‖² dλ,                                      (3)

    KL term   = ½ [α_v² (‖x‖² − D) + D log(1 + e^{λmin})]        (two Gaussians, D dimensions)
    recon     = ½ D (1 − λmax + log 2π)                          (z/α = x + e^{−λmax/2} ε)

With the exact denoiser the model's reverse process is the time reversal of the forward one, so the
gap of (3) is only the truncation (the prior at λmin, the Gaussian decoder at λmax) and the
quadrature; this is the pointwise I-MMSE relation of Kong, Brekelmans & Ver Steeg 2023,
"Information-theoretic diffusion". The integral is a Gauss–Legendre rule in λ with a fresh ε per node
and sample. As λ → ∞, ε̂ → 0 and ‖ε − ε̂‖² → ‖ε‖², whose spread (variance 2D) would dominate the
estimate; we subtract the zero-mean control variate α_v⁴ (‖ε‖² − D) = sigmoid(λ)² (‖ε‖² − D) from the
integrand (E‖ε‖² = D for any denoiser, so the estimate stays unbiased), whose weight goes from 0 at low
SNR, where ε̂ ≈ ε, to 1 (on the ``blog`` mixture it cuts the spread at λ = 8 from 2.0 to 0.34).

**Bits per dimension.** ``bits_per_dim`` = nll / (D log 2) + offset; ``dequantization_offset`` gives the
offset for quantised data (its docstring derives it for this project's pixel scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .samplers import pf_velocity
from .schedules import Schedule

__all__ = [
    "DIVERGENCES",
    "ELBO",
    "ODELikelihood",
    "bits_per_dim",
    "dequantization_offset",
    "dequantize",
    "divergence_of",
    "elbo",
    "likelihood_time_grid",
    "ode_log_likelihood",
    "probability_flow_drift",
    "rademacher",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
DIVERGENCES = ("exact", "hutchinson")


class ODELikelihood(NamedTuple):
    """Per-sample results of ``ode_log_likelihood`` (nats): ``log_prob`` = ``prior`` + ``divergence``."""

    log_prob: Tensor
    """log p_{t_min}(x), (B,)."""
    prior: Tensor
    """log N(z_{t_max}; 0, (α² c + σ²) I), (B,)."""
    divergence: Tensor
    """∫_{t_min}^{t_max} ∇·f(z_t, t) dt, (B,)."""
    z: Tensor
    """z_{t_max}, the encoding of x, x's shape."""
    nfe: int
    """Denoiser calls (4 per RK4 step)."""


class ELBO(NamedTuple):
    """Per-sample terms of the bound (3) on −log p(x) (nats): ``nll`` = ``prior`` + ``reconstruction``
    + ``diffusion`` ≥ −log p(x)."""

    nll: Tensor
    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor


# ---- the probability-flow ODE ------------------------------------------------------------------------
def _at(schedule: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """α, σ, α', σ' at t (computed in float64) as 0-dim tensors of ``like``'s dtype and device."""
    o = schedule(t.to(torch.float64))
    return tuple(v.to(like.dtype).to(like.device) for v in (o.alpha, o.sigma, o.d_alpha, o.d_sigma))


def probability_flow_drift(denoise: Denoiser, z: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """f(z, t) = α'_t x̂ + σ'_t ε̂ with ε̂ = (z − α_t x̂)/σ_t (Eq. 1; Song et al. 2021, Eq. 13, written
    with the interpolant's velocity, the blog's u_t = α̇ x + σ̇ ε). ``t`` is a 0-dim tensor."""
    return pf_velocity(z, denoise(z, t), *_at(schedule, t, z))


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """±1 with probability ½ each, drawn on the CPU (reproducible across devices), on ``like``'s device."""
    signs = torch.randint(0, 2, shape, generator=generator).to(like.dtype) * 2 - 1
    return signs.to(like.device)


def divergence_of(
    fn: Callable[[Tensor], Tensor], z: Tensor, probes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(fn(z), ∇·fn(z)) per sample for a map fn acting row-wise on a batch z (B, ...).

    ``probes`` None: the exact trace, one vector-Jacobian product per dimension (fine for 2-D).
    ``probes`` (P, B, ...): the Hutchinson–Skilling estimate (1/P) Σ_p v_pᵀ (∂fn/∂z) v_p, one
    vector-Jacobian product per probe; unbiased when E[v vᵀ] = I (Rademacher or Gaussian v).
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        out = fn(z)
        if probes is None:
            flat = out.flatten(1)
            dim = flat.shape[1]
            rows = [
                torch.autograd.grad(flat[:, i].sum(), z, retain_graph=i < dim - 1)[0].flatten(1)[:, i]
                for i in range(dim)
            ]
            div = torch.stack(rows, 1).sum(1)
        else:
            n = len(probes)
            vjps = [torch.autograd.grad(out, z, v, retain_graph=p < n - 1)[0] for p, v in enumerate(probes)]
            div = sum((vjp * v).flatten(1).sum(1) for vjp, v in zip(vjps, probes, strict=True)) / n
    return out.detach(), div.detach()


def likelihood_time_grid(
    schedule: Schedule, steps: int, t_min: float, t_max: float, rho: float = 3.0
) -> Tensor:
    """``steps + 1`` ascending times from t_min to t_max, uniform in φ^{1/ρ}, φ = arctan(σ/α) (float64)."""
    ends = schedule(torch.tensor([t_min, t_max], dtype=torch.float64))
    lo, hi = torch.atan2(ends.sigma, ends.alpha) ** (1 / rho)
    phi = torch.linspace(float(lo), float(hi), steps + 1, dtype=torch.float64) ** rho
    t = schedule.t_of_logsnr(-2 * torch.log(torch.tan(phi)))
    t[0], t[-1] = t_min, t_max  # exact ends (tan(π/2) is finite in floating point)
    return t


def _check_ode_options(
    schedule: Schedule, steps: int, t_min: float, t_max: float, divergence: str, probes: int, rho: float
) -> None:
    if steps < 1 or probes < 1 or not rho > 0:
        raise ValueError(f"ode_log_likelihood: steps={steps} and probes={probes} must be >= 1, rho={rho} > 0")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"ode_log_likelihood: need 0 <= t_min={t_min} < t_max={t_max} <= 1")
    if not float(schedule.sigma(torch.tensor(t_min, dtype=torch.float64))) > 0:
        raise ValueError(
            f"ode_log_likelihood: σ(t_min={t_min}) = 0 on {schedule!r}, so ε̂ = (z − α x̂)/σ is undefined; "
            "start at a t_min > 0 (e.g. 1e-5)"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"ode_log_likelihood: divergence={divergence!r} is unknown; allowed: {list(DIVERGENCES)}"
        )


def ode_log_likelihood(
    denoise: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    steps: int = 64,
    t_min: float = 1e-5,
    t_max: float = 1.0,
    divergence: str = "exact",
    probes: int = 1,
    generator: torch.Generator | None = None,
    data_variance: float = 1.0,
    rho: float = 3.0,
) -> ODELikelihood:
    """log p_{t_min}(x) of the model ``denoise`` by Eq. (2): RK4 with ``steps`` steps on
    ``likelihood_time_grid(rho)`` from z = x at t_min to t_max, then the prior N(0, (α² c + σ²) I) at
    t_max with c = ``data_variance`` (exact when α_{t_max} = 0). ``divergence`` is ``exact`` or
    ``hutchinson`` with ``probes`` Rademacher vectors per sample, drawn once from ``generator`` (CPU).
    Computes in x's dtype (float64 works)."""
    _check_ode_options(schedule, steps, t_min, t_max, divergence, probes, rho)
    grid = likelihood_time_grid(schedule, steps, t_min, t_max, rho).to(x.dtype)
    v = None if divergence == "exact" else rademacher((probes, *x.shape), generator, x)

    def field(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return divergence_of(lambda zz: probability_flow_drift(denoise, zz, t, schedule), z, v)

    z, delta = x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(steps):  # classical RK4 on the augmented state (z, Δ)
        t, h = grid[i], grid[i + 1] - grid[i]
        f1, d1 = field(z, t)
        f2, d2 = field(z + 0.5 * h * f1, t + 0.5 * h)
        f3, d3 = field(z + 0.5 * h * f2, t + 0.5 * h)
        f4, d4 = field(z + h * f3, grid[i + 1])
        z = z + (h / 6) * (f1 + 2 * f2 + 2 * f3 + f4)
        delta = delta + (h / 6) * (d1 + 2 * d2 + 2 * d3 + d4)
    alpha, sigma, _, _ = _at(schedule, grid[-1], x)
    var = alpha**2 * data_variance + sigma**2
    dim = z[0].numel()
    prior = -0.5 * (z.flatten(1).pow(2).sum(1) / var + dim * torch.log(2 * math.pi * var))
    return ODELikelihood(prior + delta, prior, delta, z, 4 * steps)


# ---- the ELBO ----------------------------------------------------------------------------------------
def elbo(
    denoise: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    logsnr_min: float = -12.0,
    logsnr_max: float = 12.0,
    points: int = 64,
    generator: torch.Generator | None = None,
) -> ELBO:
    """The bound (3) on −log p(x) per sample, with a ``points``-node Gauss–Legendre rule in λ on
    [logsnr_min, logsnr_max] (which must lie in the schedule's range) and one ε per node and sample,
    drawn on the CPU from ``generator``. Computes in x's dtype."""
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max) and logsnr_min < logsnr_max):
        raise ValueError(f"elbo: need finite logsnr_min={logsnr_min} < logsnr_max={logsnr_max}")
    if logsnr_min < schedule.logsnr_min - 1e-9 or logsnr_max > schedule.logsnr_max + 1e-9:
        raise ValueError(
            f"elbo: [logsnr_min, logsnr_max] = [{logsnr_min}, {logsnr_max}] leaves the range "
            f"[{schedule.logsnr_min:.6g}, {schedule.logsnr_max:.6g}] of {schedule!r}"
        )
    if points < 1:
        raise ValueError(f"elbo: points={points} must be >= 1")
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(points))
    half_range = 0.5 * (logsnr_max - logsnr_min)
    logsnr = logsnr_min + half_range * (nodes + 1)
    dim = x[0].numel()
    diffusion = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for lam, w in zip(logsnr, weights * half_range, strict=True):
        t = schedule.t_of_logsnr(lam).to(x.dtype)
        alpha, sigma, _, _ = _at(schedule, t, x)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        z = alpha * x + sigma * eps
        eps_hat = (z - alpha * denoise(z, t)) / sigma
        control = torch.sigmoid(lam).item() ** 2 * (eps.flatten(1).pow(2).sum(1) - dim)
        diffusion = diffusion + 0.5 * w.item() * ((eps - eps_hat).flatten(1).pow(2).sum(1) - control)
    lam_min = torch.tensor(logsnr_min, dtype=x.dtype)
    alpha2 = torch.sigmoid(lam_min).to(x.device)
    softplus = torch.nn.functional.softplus(lam_min).to(x.device)
    prior = 0.5 * (alpha2 * (x.flatten(1).pow(2).sum(1) - dim) + dim * softplus)
    reconstruction = torch.full_like(prior, 0.5 * dim * (1 - logsnr_max + math.log(2 * math.pi)))
    return ELBO(prior + reconstruction + diffusion, prior, reconstruction, diffusion)


# ---- units ---------------------------------------------------------------------------------------------
def dequantization_offset(levels: int = 256) -> float:
    """log₂((levels − 1)/2): the bits/dim to add to a continuous NLL of uniformly dequantised data with
    ``levels`` values per dimension scaled to [−1, 1] as k·2/(levels − 1) − 1.

    8-bit pixels here are x = k/127.5 − 1 (``data.transforms.to_unit_range``), and
    ``metrics.extractors.to_uint8`` maps x back by ⌊127.5 x + 128⌋, i.e. to the bin of width
    Δ = 1/127.5 centred on k/127.5 − 1. Dequantising y = x + (u − ½)Δ, u ~ U[0, 1)^D, fills those
    bins, and a continuous density p gives the discrete model P(k) = ∫_bin p(y) dy = Δ^D E_u[p(y)];
    by Jensen, −log₂ P(k) ≤ E_u[−log₂ p(y)] − D log₂ Δ, so

        bits/dim ≤ E[−log p(y)] / (D ln 2) + log₂ 127.5,    log₂ 127.5 = 6.99435…

    (Theis et al. 2016, "A note on the evaluation of generative models"; Ho et al. 2019, Flow++).
    Song et al.'s 7 = log₂ 128 is for bins of width 2/256 (pixels (k + u)/256 on [0, 1]
    mapped to [−1, 1]), not for this scaling; the two differ by log₂(128/127.5) = 0.0056 bits/dim.
    """
    if levels < 2:
        raise ValueError(f"dequantization_offset: levels={levels} must be >= 2")
    return math.log2((levels - 1) / 2)


def dequantize(x: Tensor, generator: torch.Generator | None = None, levels: int = 256) -> Tensor:
    """y = x + (u − ½) Δ, u ~ U[0, 1) drawn on the CPU, Δ = 2/(levels − 1): uniform noise filling the
    bin of each quantised value k·Δ − 1 (for 8-bit pixels, the bins ``metrics.extractors.to_uint8``
    rounds to k, so ``to_uint8(dequantize(x)) == to_uint8(x)``)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + (u - 0.5) * (2 / (levels - 1))


def bits_per_dim(nll_nats: Tensor | float, dim: int, offset: float = 0.0) -> Tensor | float:
    """nll / (D ln 2) + offset: nats per sample to bits per dimension (``offset`` from
    ``dequantization_offset`` for quantised data, 0 for continuous data)."""
    return nll_nats / (dim * math.log(2)) + offset
