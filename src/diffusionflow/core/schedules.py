"""Noise schedules: z_t = α_t x + σ_t ε with t ∈ [0, 1], t = 0 data, t = 1 noise.

A schedule is two independent choices (Kingma & Gao 2023, §2; the blog "Diffusion Meets Flow
Matching", "Training"):

* a *scaling* that maps the log-SNR λ = log(α²/σ²) to (α, σ): variance preserving (α² + σ² = 1),
  flow / rectified flow (α + σ = 1) or variance exploding (α = 1);
* a *shape* λ(t), the time parametrisation.

Every schedule takes log-SNR endpoints (λ_min, λ_max), reached at t = 1 and t = 0: the shape is
truncated as in Kingma & Gao App. D (t ↦ τ_lo + t (τ_hi − τ_lo) on the shape's own time τ). The
default endpoints are the shape's natural ones (±∞ for ``cosine`` and ``flow``, so ``flow`` is
exactly α = 1 − t, σ = t). Two transforms act on any schedule:

* ``shift`` s (SD3, Esser et al. 2024, §5.3.2): λ → λ − 2 log s. On the flow schedule this is
  t ↦ s t / (1 + (s − 1) t), which is also diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)``
  σ' = s σ / (1 + (s − 1) σ). The endpoints are given before the shift.
* ``scale`` c_t (the blog, "DDIM is invariant to scaling"): (α_t, σ_t) → (c_t α_t, c_t σ_t); λ is
  unchanged. ``scale="vp"`` chooses c_t = 1/√(α_t² + σ_t²), which turns any schedule into a VP one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid

__all__ = [
    "EDM",
    "SCHEDULES",
    "Cosine",
    "Flow",
    "Linear",
    "Schedule",
    "ScheduleOutput",
    "build",
]

ScaleFn = Callable[[Tensor], Tensor]


def _as_tensor(t: Tensor | float) -> Tensor:
    return t if torch.is_tensor(t) else torch.as_tensor(t, dtype=torch.get_default_dtype())


@dataclass(frozen=True)
class ScheduleOutput:
    """(α_t, σ_t), their time derivatives and the log-SNR λ_t with dλ/dt, at one t."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor
    logsnr: Tensor
    dlogsnr: Tensor


class Schedule:
    """Base class: a scaling (``log_alpha_of``/``log_sigma_of`` λ) and a shape (``shape_*`` of τ).

    Subclasses implement ``shape_logsnr(τ)``, ``shape_dlogsnr(τ)``, ``shape_tau(λ)`` on the shape's
    own time τ ∈ [0, 1], and ``log_alpha_of(λ)``, ``log_sigma_of(λ)``.
    """

    name = "schedule"

    def __init__(
        self,
        logsnr_min: float | None = None,
        logsnr_max: float | None = None,
        shift: float = 1.0,
        scale: float | str | ScaleFn | None = None,
    ) -> None:
        lo = -math.inf if logsnr_min is None else float(logsnr_min)
        hi = math.inf if logsnr_max is None else float(logsnr_max)
        if not lo < hi:
            raise ValueError(
                f"schedule {self.name}: logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}"
            )
        if not shift > 0:
            raise ValueError(f"schedule {self.name}: shift={shift} must be > 0")
        self._check_endpoints(lo, hi)
        self.shift = float(shift)
        self.scale = scale
        # An endpoint left out is the shape's own (τ = 0 or 1).
        self._tau_lo = 0.0 if logsnr_max is None else self._shape_tau_float(hi)
        self._tau_hi = 1.0 if logsnr_min is None else self._shape_tau_float(lo)
        if not self._tau_lo < self._tau_hi:
            raise ValueError(
                f"schedule {self.name}: logsnr_min={logsnr_min}, logsnr_max={logsnr_max} leave an empty range"
            )

    # ---- subclass interface -------------------------------------------------------------------
    def shape_logsnr(self, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def shape_dlogsnr(self, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def shape_tau(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        """= dlogα/dλ − ½, written per scaling without that cancellation."""
        raise NotImplementedError

    def _check_endpoints(self, lo: float, hi: float) -> None:
        """Subclasses reject endpoints their shape cannot reach."""

    # ---- derived ------------------------------------------------------------------------------
    def _shape_tau_float(self, logsnr: float) -> float:
        return float(self.shape_tau(torch.tensor(logsnr, dtype=torch.float64)))

    def _tau(self, t: Tensor) -> Tensor:
        return self._tau_lo + t * (self._tau_hi - self._tau_lo)

    def logsnr(self, t: Tensor) -> Tensor:
        """λ_t = log(α_t²/σ_t²), decreasing in t."""
        t = _as_tensor(t)
        return self.shape_logsnr(self._tau(t)) - 2.0 * math.log(self.shift)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        """dλ/dt (negative)."""
        t = _as_tensor(t)
        return self.shape_dlogsnr(self._tau(t)) * (self._tau_hi - self._tau_lo)

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of λ_t; extends beyond [0, 1] where the shape allows."""
        tau = self.shape_tau(logsnr + 2.0 * math.log(self.shift))
        return (tau - self._tau_lo) / (self._tau_hi - self._tau_lo)

    @property
    def logsnr_min(self) -> float:
        """λ at t = 1 (after the shift)."""
        return float(self.logsnr(torch.tensor(1.0, dtype=torch.float64)))

    @property
    def logsnr_max(self) -> float:
        """λ at t = 0 (after the shift)."""
        return float(self.logsnr(torch.tensor(0.0, dtype=torch.float64)))

    def _log_scale(self, t: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        """log c_t and d log c_t / dt for the ``scale`` transform."""
        if self.scale is None:
            zero = torch.zeros_like(logsnr)
            return zero, zero
        if isinstance(self.scale, int | float):
            return torch.full_like(logsnr, math.log(self.scale)), torch.zeros_like(logsnr)
        if self.scale == "vp":
            # c = (α² + σ²)^(-1/2) on the unscaled pair, in log space for stability.
            la, ls = self.log_alpha_of(logsnr), self.log_sigma_of(logsnr)
            log_c = -0.5 * torch.logaddexp(2 * la, 2 * ls)
            # d log c/dλ = −(α² dlogα/dλ + σ² dlogσ/dλ)/(α² + σ²).
            a2 = torch.exp(2 * (la + log_c))
            s2 = torch.exp(2 * (ls + log_c))
            dlogc_dlam = -(a2 * self.dlog_alpha_dlogsnr(logsnr) + s2 * self.dlog_sigma_dlogsnr(logsnr))
            return log_c, dlogc_dlam * self.dlogsnr_dt(t)
        if callable(self.scale):
            with torch.enable_grad():
                tt = t.detach().clone().requires_grad_(True)
                log_c = torch.log(self.scale(tt))
                (d,) = torch.autograd.grad(log_c.sum(), tt)
            return log_c.detach().expand_as(logsnr), d.expand_as(logsnr)
        raise ValueError(f"schedule scale={self.scale!r}: allowed a positive number, 'vp' or a callable c(t)")

    def _derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """dα/dt = α (dlogα/dλ · λ' + dlog c/dt) and dσ/dt = σ (dlogσ/dλ · λ' + dlog c/dt)."""
        lam, dlam = self.logsnr(t), self.dlogsnr_dt(t)
        log_c, dlog_c = self._log_scale(t, lam)
        d_alpha = torch.exp(self.log_alpha_of(lam) + log_c) * (self.dlog_alpha_dlogsnr(lam) * dlam + dlog_c)
        d_sigma = torch.exp(self.log_sigma_of(lam) + log_c) * (self.dlog_sigma_dlogsnr(lam) * dlam + dlog_c)
        return d_alpha, d_sigma

    def __call__(self, t: Tensor) -> ScheduleOutput:
        """All quantities at t. Where λ = ±∞ (the natural ends of ``cosine`` and ``flow``) the
        derivatives of α and σ are 0 · ∞ as written; there they are the one-sided limits, taken at
        t clamped to [δ, 1 − δ], δ = 2⁻³⁰ (exact in float64; the error is O(δ))."""
        t = _as_tensor(t)
        lam = self.logsnr(t)
        log_c, _ = self._log_scale(t, lam)
        alpha = torch.exp(self.log_alpha_of(lam) + log_c)
        sigma = torch.exp(self.log_sigma_of(lam) + log_c)
        d_alpha, d_sigma = self._derivatives(t)
        if not (torch.isfinite(d_alpha).all() and torch.isfinite(d_sigma).all()):
            inner = self._derivatives(t.to(torch.float64).clamp(2.0**-30, 1 - 2.0**-30))
            d_alpha = torch.where(torch.isfinite(d_alpha), d_alpha, inner[0].to(t.dtype))
            d_sigma = torch.where(torch.isfinite(d_sigma), d_sigma, inner[1].to(t.dtype))
        return ScheduleOutput(alpha, sigma, d_alpha, d_sigma, lam, self.dlogsnr_dt(t))

    def alpha(self, t: Tensor) -> Tensor:
        return self(t).alpha

    def sigma(self, t: Tensor) -> Tensor:
        return self(t).sigma

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(logsnr_min={self.logsnr_min:.4g}, logsnr_max={self.logsnr_max:.4g}, "
            f"shift={self.shift}, scale={self.scale!r})"
        )


class VariancePreserving(Schedule):
    """α² = sigmoid(λ), σ² = sigmoid(−λ) (math.md, conventions)."""

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        return 0.5 * logsigmoid(logsnr)

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        return 0.5 * logsigmoid(-logsnr)

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return 0.5 * torch.sigmoid(-logsnr)

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return -0.5 * torch.sigmoid(logsnr)


class Cosine(VariancePreserving):
    """α = cos(πτ/2), σ = sin(πτ/2): λ(τ) = −2 log tan(πτ/2) (Nichol & Dhariwal 2021; blog)."""

    name = "cosine"

    def shape_logsnr(self, tau: Tensor) -> Tensor:
        # tan(π/2) is 1.6e16 in floating point: τ = 1 is set to λ = −∞ (α = 0) exactly.
        lam = -2.0 * torch.log(torch.tan(0.5 * math.pi * tau))
        return torch.where(tau >= 1, -math.inf, lam)

    def shape_dlogsnr(self, tau: Tensor) -> Tensor:
        return torch.where(tau >= 1, -math.inf, -2.0 * math.pi / torch.sin(math.pi * tau))

    def shape_tau(self, logsnr: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * logsnr))


class Linear(VariancePreserving):
    """DDPM linear-β in continuous time (Song et al. 2021, VP-SDE):
    α² = exp(−β_min τ − ½(β_max − β_min) τ²), so λ(τ) = −log expm1(β_min τ + ½ β_d τ²)."""

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, **kwargs) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"schedule linear: need 0 < beta_min={beta_min} < beta_max={beta_max}")
        self.beta_min, self.beta_d = float(beta_min), float(beta_max - beta_min)
        super().__init__(**kwargs)

    def _integral(self, tau: Tensor) -> Tensor:
        return self.beta_min * tau + 0.5 * self.beta_d * tau**2

    def shape_logsnr(self, tau: Tensor) -> Tensor:
        return -torch.log(torch.expm1(self._integral(tau)))

    def shape_dlogsnr(self, tau: Tensor) -> Tensor:
        b = self.beta_min + self.beta_d * tau
        return -b / -torch.expm1(-self._integral(tau))

    def shape_tau(self, logsnr: Tensor) -> Tensor:
        c = torch.nn.functional.softplus(-logsnr)  # log(1 + e^{-λ}) = ∫β
        return (torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * c) - self.beta_min) / self.beta_d


class Flow(Schedule):
    """Rectified flow / flow matching: α = 1 − τ, σ = τ, λ(τ) = 2 log((1 − τ)/τ) (blog; SD3 §3.1).

    Scaling α + σ = 1: α = sigmoid(λ/2), σ = sigmoid(−λ/2).
    """

    name = "flow"

    def shape_logsnr(self, tau: Tensor) -> Tensor:
        return 2.0 * (torch.log1p(-tau) - torch.log(tau))

    def shape_dlogsnr(self, tau: Tensor) -> Tensor:
        return -2.0 / (tau * (1.0 - tau))

    def shape_tau(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * logsnr)

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        return logsigmoid(0.5 * logsnr)

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        return logsigmoid(-0.5 * logsnr)

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return 0.5 * torch.sigmoid(-0.5 * logsnr)

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return -0.5 * torch.sigmoid(0.5 * logsnr)


class EDM(Schedule):
    """Variance exploding (α = 1) with EDM's ρ-spaced σ (Karras et al. 2022, Eq. 5):
    σ(τ) = (σ_min^{1/ρ} + τ (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ, λ = −2 log σ.

    The endpoints are σ_min = e^{−λ_max/2}, σ_max = e^{−λ_min/2}; defaults EDM's 0.002 and 80.
    """

    name = "edm"

    def __init__(
        self,
        logsnr_min: float | None = None,
        logsnr_max: float | None = None,
        rho: float = 7.0,
        **kwargs,
    ) -> None:
        self.rho = float(rho)
        lo = -2 * math.log(80.0) if logsnr_min is None else logsnr_min
        hi = -2 * math.log(0.002) if logsnr_max is None else logsnr_max
        self._smin = math.exp(-0.5 * hi) ** (1 / self.rho)
        self._smax = math.exp(-0.5 * lo) ** (1 / self.rho)
        super().__init__(logsnr_min=lo, logsnr_max=hi, **kwargs)

    def _check_endpoints(self, lo: float, hi: float) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"schedule edm: logsnr_min={lo}, logsnr_max={hi} must be finite")

    def shape_logsnr(self, tau: Tensor) -> Tensor:
        return -2.0 * self.rho * torch.log(self._smin + tau * (self._smax - self._smin))

    def shape_dlogsnr(self, tau: Tensor) -> Tensor:
        return -2.0 * self.rho * (self._smax - self._smin) / (self._smin + tau * (self._smax - self._smin))

    def shape_tau(self, logsnr: Tensor) -> Tensor:
        return (torch.exp(-0.5 * logsnr / self.rho) - self._smin) / (self._smax - self._smin)

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        return -0.5 * logsnr

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return torch.full_like(logsnr, -0.5)


SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (Cosine, Linear, Flow, EDM)}


def build(name: str, **kwargs) -> Schedule:
    """A schedule by name: ``cosine``, ``linear``, ``flow``, ``edm`` (keyword options as above)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
