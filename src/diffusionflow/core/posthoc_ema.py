"""Post-hoc EMA (Karras et al. 2024, EDM2, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and App. C): average the weights of a finished run with any EMA length, chosen afterwards.

Time t counts training images. A power-function EMA with exponent γ (§3.1) averages the weights θ(τ)
seen up to t with the density

    p_{t,γ}(τ) = (γ+1) τ^γ / t^{γ+1},   0 < τ ≤ t,        θ̂_γ(t) = ∫_0^t p_{t,γ}(τ) θ(τ) dτ,

and ∫_0^t p_{t,γ} = [τ^{γ+1}]_0^t / t^{γ+1} = 1 for γ > −1. After an update of Δt images it is
θ̂ ← β θ̂ + (1 − β) θ with β = (1 − Δt/t)^{γ+1}: the update ending at t_j = jΔt then has the weight
(1 − β_j) Π_{i>j} β_i = (t_j^{γ+1} − t_{j−1}^{γ+1}) / t^{γ+1} = ∫_{t_{j−1}}^{t_j} p_{t,γ}, so the running
average is the integral above *exactly*, for θ constant over each update. Its width relative to t is
σ_rel = std(τ)/t = ((γ+1) / ((γ+2)²(γ+3)))^{1/2} (§3.1).

Post-hoc (App. C.2): during training, snapshots θ̂_i = θ̂_{γ_i}(t_i) of a few profiles are stored. A
target profile p_r = p_{t_r,γ_r} is approximated in L² by Σ_i x_i p_i with x the least-squares solution
A x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩ (closed forms below); by linearity Σ_i x_i θ̂_i is then
the average with the profile Σ_i x_i p_i. How far that profile is from p_r is the relative residual
‖Σ x_i p_i − p_r‖ / ‖p_r‖, also in closed form; a target it cannot reach is refused (``MAX_RESIDUAL``).
Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from diffusionflow.errors import ConfigError

__all__ = [
    "GAMMA_AT_MAX",
    "MAX_RESIDUAL",
    "SIGMA_REL_MAX",
    "beta",
    "check_reconstructable",
    "gamma_of_sigma_rel",
    "inner_product",
    "profile",
    "reconstruct",
    "reconstructable_range",
    "sigma_rel_of_gamma",
    "solve_coefficients",
]

GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
"""The γ of the widest profile: d/dγ log σ_rel² = 1/(γ+1) − 2/(γ+2) − 1/(γ+3) = 0 ⇔ γ² + 3γ + 1 = 0."""
SIGMA_REL_MAX = ((1.0 + math.sqrt(5.0)) / 2.0) ** -2.5
"""σ_rel at ``GAMMA_AT_MAX`` (γ+1 = 1/φ, γ+2 = φ, γ+3 = φ², so σ_rel² = φ^{−5}): ≈ 0.3003, the widest
power-function profile. Each σ_rel in (0, SIGMA_REL_MAX) has one γ > GAMMA_AT_MAX (used here) and one
in (−1, GAMMA_AT_MAX), where σ_rel → 0 again as γ → −1 (a profile piling up at τ = 0)."""
MAX_RESIDUAL = 0.05
"""Largest accepted relative L² residual ‖Σ x_i p_i − p_r‖ / ‖p_r‖. For weights that fluctuate like
white noise about their trend, the reconstruction's deviation from the target average is this fraction
of the target average's own fluctuation (the variance of ∫ f θ is ∝ ‖f‖²): 5 % is invisible next to the
EMA's own noise. With σ_rel 0.05 and 0.10 tracked and n snapshots of each, evenly spaced, it accepts
σ_rel ≈ 0.025–0.24 at n = 20, ≈ 0.0074–0.28 at n = 100 and ≈ 0.003–0.28 at n = 256 (EDM2's range,
0.01–0.25, from about n = 75 on), and refuses σ_rel = 0.001 (a profile one thousandth of the run wide)
up to n = 300 at least."""


def profile(tau: Tensor, t: float, gamma: float) -> Tensor:
    """p_{t,γ}(τ) = (γ+1) τ^γ / t^{γ+1} on 0 < τ ≤ t, zero elsewhere (EDM2 §3.1)."""
    inside = (tau > 0) & (tau <= t)
    return torch.where(inside, (gamma + 1) * (tau / t) ** gamma / t, 0.0)


def beta(t: float, dt: float, gamma: float) -> float:
    """The decay of the update of ``dt`` images that ends at ``t``: β = (1 − Δt/t)^{γ+1} (EDM2 §3.1,
    with t in images instead of steps); 0 for the first update (t = Δt), which copies the weights."""
    return (1.0 - dt / t) ** (gamma + 1.0)


def sigma_rel_of_gamma(gamma: float) -> float:
    """σ_rel = ((γ+1) / ((γ+2)²(γ+3)))^{1/2}, the profile's standard deviation over t (EDM2 §3.1)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The γ > ``GAMMA_AT_MAX`` of ``sigma_rel`` ∈ (0, ``SIGMA_REL_MAX``): the largest real root of the
    cubic σ_rel²(γ+2)²(γ+3) − (γ+1) = 0, found by bisection in float64 on [GAMMA_AT_MAX, 1/σ_rel], where
    σ_rel(γ) decreases (σ_rel(γ) < 1/(γ+2), so σ_rel(1/σ_rel) < σ_rel)."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(
            f"sigma_rel={sigma_rel} is not the width of a power-function EMA profile; allowed: "
            f"0 < sigma_rel < {SIGMA_REL_MAX:.4f} (the widest profile, γ = {GAMMA_AT_MAX:.4f})"
        )
    lo, hi = GAMMA_AT_MAX, 1.0 / sigma_rel
    while True:
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            return mid
        lo, hi = (mid, hi) if sigma_rel_of_gamma(mid) > sigma_rel else (lo, mid)


def inner_product(
    t_a: Tensor | float, gamma_a: Tensor | float, t_b: Tensor | float, gamma_b: Tensor | float
) -> Tensor:
    """⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ = ∫_0^m (γ_a+1)(γ_b+1) τ^{γ_a+γ_b} dτ / (t_a^{γ_a+1} t_b^{γ_b+1}) with
    m = min(t_a, t_b), M = max: = (γ_a+1)(γ_b+1) / (γ_a+γ_b+1) · (m/M)^{γ_M} / M, γ_M the exponent of the
    profile ending at M (EDM2 App. C.2). Written with m/M ≤ 1, so large t and γ do not overflow; finite
    for γ_a + γ_b > −1 (square-integrable profiles: γ > −1/2). Broadcasts; float64."""
    values = (t_a, gamma_a, t_b, gamma_b)
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in values)
    m, M = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    gamma_M = torch.where(t_a <= t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (m / M) ** gamma_M / M


def _least_squares(
    ts: Sequence[float], gammas: Sequence[float], t_r: float, gammas_r: Tensor
) -> tuple[Tensor, Tensor]:
    """x_k = lstsq(A, b_k) for every target exponent γ_r,k at t_r (one SVD of A for all), and each
    target's relative residual (see :func:`solve_coefficients`)."""
    t = torch.as_tensor(ts, dtype=torch.float64) / t_r
    g = torch.as_tensor(gammas, dtype=torch.float64)
    A = inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    B = inner_product(t[:, None], g[:, None], 1.0, gammas_r[None, :])
    X = torch.linalg.lstsq(A, B, driver="gelsd").solution
    norm2 = inner_product(1.0, gammas_r, 1.0, gammas_r)
    residual2 = (X * (A @ X)).sum(0) - 2 * (X * B).sum(0) + norm2
    return X, (residual2.clamp(min=0) / norm2).sqrt()


def solve_coefficients(
    ts: Sequence[float], gammas: Sequence[float], t_r: float, gamma_r: float
) -> tuple[Tensor, float]:
    """x minimising ‖Σ_i x_i p_{t_i,γ_i} − p_{t_r,γ_r}‖ (EDM2 App. C.2, Algorithm 3): x = lstsq(A, b) with
    A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩; and the relative residual ‖Σ x_i p_i − p_r‖ / ‖p_r‖ from
    ‖·‖² = xᵀAx − 2xᵀb + ⟨p_r, p_r⟩ (float64 rounding puts a floor of about 1e-8 under it). Times are
    divided by t_r first, which scales A and b alike and leaves x unchanged. ``gelsd`` (SVD) gives the
    minimum-norm x when nearly equal snapshots make A singular."""
    X, residual = _least_squares(ts, gammas, t_r, torch.tensor([gamma_r], dtype=torch.float64))
    return X[:, 0], float(residual[0])


def reconstructable_range(
    ts: Sequence[float], gammas: Sequence[float], t_r: float, max_residual: float = MAX_RESIDUAL
) -> tuple[float, float] | None:
    """The smallest and largest σ_rel of a geometric grid (factor ≈ 1.02 from 0.001 to ``SIGMA_REL_MAX``)
    whose residual at t_r is at most ``max_residual``; None if none is."""
    grid = torch.logspace(-3, math.log10(SIGMA_REL_MAX), 289, dtype=torch.float64)[:-1]
    gammas_r = torch.tensor([gamma_of_sigma_rel(float(s)) for s in grid], dtype=torch.float64)
    ok = grid[_least_squares(ts, gammas, t_r, gammas_r)[1] <= max_residual].tolist()
    return (ok[0], ok[-1]) if ok else None


def check_reconstructable(
    ts: Sequence[float],
    gammas: Sequence[float],
    t_r: float,
    sigma_rel: float,
    max_residual: float = MAX_RESIDUAL,
) -> Tensor:
    """The coefficients x of profile ``sigma_rel`` at ``t_r`` from snapshots at times ``ts`` (images) with
    exponents ``gammas``, or a ``ConfigError`` when its residual exceeds ``max_residual``: naming
    σ_rel, the tracked σ_rels, the residual and the range these snapshots can reconstruct. Needs no
    weights, so callers check before loading any."""
    if not ts:
        raise ConfigError(f"sigma_rel={sigma_rel}: no post-hoc EMA snapshots to reconstruct it from")
    x, residual = solve_coefficients(ts, gammas, t_r, gamma_of_sigma_rel(sigma_rel))
    if residual > max_residual:
        tracked = sorted({round(sigma_rel_of_gamma(g), 6) for g in gammas})
        span = reconstructable_range(ts, gammas, t_r, max_residual)
        allowed = "none" if span is None else f"about {span[0]:.3g} to {span[1]:.3g}"
        raise ConfigError(
            f"sigma_rel={sigma_rel} is outside what the stored EMA profiles can reconstruct: from "
            f"{len(ts)} snapshots of sigma_rel {tracked} up to t={t_r:g} images its relative L2 residual "
            f"is {residual:.3g} > {max_residual}; reconstructable: sigma_rel {allowed}"
        )
    return x


def reconstruct(
    snapshots: Sequence[tuple[float, float, Mapping[str, Tensor]]],
    sigma_rel: float,
    t_r: float | None = None,
    max_residual: float = MAX_RESIDUAL,
) -> dict[str, Tensor]:
    """The weights averaged with profile ``sigma_rel`` at ``t_r`` (default: the newest snapshot's t), from
    ``snapshots`` of (t in images, γ, state dict): Σ_i x_i θ̂_i for every floating tensor, summed in
    float64 and returned in the snapshots' dtype; other tensors (integer buffers) from the newest
    snapshot. A ``ConfigError`` (:func:`check_reconstructable`) if the residual exceeds ``max_residual``."""
    ts, gammas, states = zip(*snapshots, strict=True) if snapshots else ((), (), ())
    t_r = max(ts, default=1.0) if t_r is None else t_r
    x = check_reconstructable(list(ts), list(gammas), t_r, sigma_rel, max_residual).tolist()
    newest = states[max(range(len(ts)), key=ts.__getitem__)]
    out = {}
    for name, value in newest.items():
        if not value.is_floating_point():
            out[name] = value.clone()
            continue
        total = sum(c * state[name].to(torch.float64) for c, state in zip(x, states, strict=True))
        out[name] = total.to(value.dtype)
    return out
