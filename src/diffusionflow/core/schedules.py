"""Noise schedules: z_t = α_t x + σ_t ε with t ∈ [0, 1], t = 0 data, t = 1 noise.

A schedule is two independent choices (Kingma & Gao 2023, §2; the blog "Diffusion Meets Flow
Matching", "Training"):

* a *scaling* that maps the log-SNR λ = log(α²/σ²) to (α, σ): variance preserving (α² + σ² = 1),
  flow / rectified flow (α + σ = 1) or variance exploding (α = 1);
* a *shape* λ(t), the time parametrisation.

A new schedule is a short ``Schedule`` subclass that states both in its own time at its natural ends
(``BareCosine`` … ``BareEDM`` below). Three wrappers act on any schedule:

* ``Truncated``: log-SNR endpoints (λ_min, λ_max) reached at t = 1 and t = 0 (Kingma & Gao App. D);
* ``Shifted``: λ → λ − 2 log s (SD3, Esser et al. 2024, §5.3.2);
* ``Scaled``: (α_t, σ_t) → (c_t α_t, c_t σ_t) (the blog, "DDIM is invariant to scaling").

The registry's classes ``Cosine``, ``Linear``, ``Flow``, ``EDM`` are ``Composed``: a bare schedule with
the options ``logsnr_min``, ``logsnr_max``, ``shift`` and ``scale`` applied in that order. Their default
endpoints are the shape's natural ones (±∞ for ``cosine`` and ``flow``, so ``flow`` is exactly
α = 1 − t, σ = t).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid, softplus

from .registry import Registry

__all__ = [
    "EDM",
    "SCHEDULES",
    "BareCosine",
    "BareEDM",
    "BareFlow",
    "BareLinear",
    "Composed",
    "Cosine",
    "Flow",
    "Linear",
    "Scaled",
    "Schedule",
    "ScheduleOutput",
    "Shifted",
    "Truncated",
    "VariancePreserving",
    "Wrapper",
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
    """A shape λ(t) with its inverse, and a scaling λ ↦ (log α, log σ) with its λ-derivatives.

    A subclass implements the seven methods above ``log_scale`` on tensors; the rest is derived:
    α = c exp(log α(λ)), dα/dt = α (dlogα/dλ · dλ/dt + dlog c/dt), σ likewise, with c = 1 unless
    ``Scaled``.
    """

    name = "schedule"
    shift = 1.0
    scale: float | str | ScaleFn | None = None

    # ---- shape ------------------------------------------------------------------------------------
    def logsnr(self, t: Tensor) -> Tensor:
        """λ_t = log(α_t²/σ_t²), decreasing in t."""
        raise NotImplementedError

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        """dλ/dt (negative)."""
        raise NotImplementedError

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of λ_t; extends beyond [0, 1] where the shape allows."""
        raise NotImplementedError

    # ---- scaling ----------------------------------------------------------------------------------
    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        """= dlogα/dλ − ½, written per scaling without that cancellation."""
        raise NotImplementedError

    def log_scale(self, t: Tensor, logsnr: Tensor, dlogsnr: Tensor) -> tuple[Tensor, Tensor]:
        """log c_t and d log c_t/dt of the ``Scaled`` transform; here c = 1."""
        zero = torch.zeros_like(logsnr)
        return zero, zero

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def logsnr_min(self) -> float:
        """λ at t = 1."""
        return float(self.logsnr(torch.tensor(1.0, dtype=torch.float64)))

    @property
    def logsnr_max(self) -> float:
        """λ at t = 0."""
        return float(self.logsnr(torch.tensor(0.0, dtype=torch.float64)))

    def _at(self, t: Tensor) -> ScheduleOutput:
        lam, dlam = self.logsnr(t), self.dlogsnr_dt(t)
        log_c, dlog_c = self.log_scale(t, lam, dlam)
        alpha = torch.exp(self.log_alpha_of(lam) + log_c)
        sigma = torch.exp(self.log_sigma_of(lam) + log_c)
        d_alpha = alpha * (self.dlog_alpha_dlogsnr(lam) * dlam + dlog_c)
        d_sigma = sigma * (self.dlog_sigma_dlogsnr(lam) * dlam + dlog_c)
        return ScheduleOutput(alpha, sigma, d_alpha, d_sigma, lam, dlam)

    def __call__(self, t: Tensor | float) -> ScheduleOutput:
        """All quantities at t. Where λ = ±∞ (the natural ends of ``cosine`` and ``flow``) the
        derivatives of α and σ are 0 · ∞ as written; there they are the one-sided limits, taken at
        t clamped to [δ, 1 − δ], δ = 2⁻³⁰ (exact in float64; the error is O(δ))."""
        t = _as_tensor(t)
        o = self._at(t)
        # Both evaluated and selected elementwise: no test on the host (a device sync every training step).
        inner = self._at(t.to(torch.float64).clamp(2.0**-30, 1 - 2.0**-30))
        d_alpha = torch.where(torch.isfinite(o.d_alpha), o.d_alpha, inner.d_alpha.to(o.d_alpha.dtype))
        d_sigma = torch.where(torch.isfinite(o.d_sigma), o.d_sigma, inner.d_sigma.to(o.d_sigma.dtype))
        return replace(o, d_alpha=d_alpha, d_sigma=d_sigma)

    def alpha(self, t: Tensor | float) -> Tensor:
        return self(t).alpha

    def sigma(self, t: Tensor | float) -> Tensor:
        return self(t).sigma

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(logsnr_min={self.logsnr_min:.4g}, logsnr_max={self.logsnr_max:.4g}, "
            f"shift={self.shift}, scale={self.scale!r})"
        )


# ---- wrappers ---------------------------------------------------------------------------------------
class Wrapper(Schedule):
    """A schedule that changes one part of ``base`` and hands every other part to it."""

    def __init__(self, base: Schedule) -> None:
        self.base = base
        self.name, self.shift, self.scale = base.name, base.shift, base.scale

    def logsnr(self, t: Tensor) -> Tensor:
        return self.base.logsnr(t)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return self.base.dlogsnr_dt(t)

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        return self.base.t_of_logsnr(logsnr)

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        return self.base.log_alpha_of(logsnr)

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        return self.base.log_sigma_of(logsnr)

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return self.base.dlog_alpha_dlogsnr(logsnr)

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return self.base.dlog_sigma_dlogsnr(logsnr)

    def log_scale(self, t: Tensor, logsnr: Tensor, dlogsnr: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.log_scale(t, logsnr, dlogsnr)


class Truncated(Wrapper):
    """``base`` between log-SNR endpoints λ_min at t = 1 and λ_max at t = 0 (Kingma & Gao 2023, App. D):
    t ↦ τ = τ_lo + t (τ_hi − τ_lo) on the base's time τ, with τ_lo = τ(λ_max), τ_hi = τ(λ_min). An
    endpoint left out is the base's own (τ = 0 or 1). Accepts a float t."""

    def __init__(
        self, base: Schedule, logsnr_min: float | None = None, logsnr_max: float | None = None
    ) -> None:
        lo = -math.inf if logsnr_min is None else float(logsnr_min)
        hi = math.inf if logsnr_max is None else float(logsnr_max)
        if not lo < hi:
            raise ValueError(
                f"schedule {base.name}: logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}"
            )
        super().__init__(base)
        self.tau_lo = 0.0 if logsnr_max is None else self._base_tau(hi)
        self.tau_hi = 1.0 if logsnr_min is None else self._base_tau(lo)
        if not self.tau_lo < self.tau_hi:
            raise ValueError(
                f"schedule {base.name}: logsnr_min={logsnr_min}, logsnr_max={logsnr_max} leave an empty range"
            )

    def _base_tau(self, logsnr: float) -> float:
        return float(self.base.t_of_logsnr(torch.tensor(logsnr, dtype=torch.float64)))

    def _tau(self, t: Tensor | float) -> Tensor:
        return self.tau_lo + _as_tensor(t) * (self.tau_hi - self.tau_lo)

    def logsnr(self, t: Tensor) -> Tensor:
        return self.base.logsnr(self._tau(t))

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return self.base.dlogsnr_dt(self._tau(t)) * (self.tau_hi - self.tau_lo)

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        return (self.base.t_of_logsnr(logsnr) - self.tau_lo) / (self.tau_hi - self.tau_lo)


class Shifted(Wrapper):
    """SD3's resolution shift s (Esser et al. 2024, §5.3.2): λ → λ − 2 log s. On the flow schedule
    this is t ↦ s t / (1 + (s − 1) t), also diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)``
    σ' = s σ / (1 + (s − 1) σ)."""

    def __init__(self, base: Schedule, shift: float) -> None:
        if not shift > 0:
            raise ValueError(f"schedule {base.name}: shift={shift} must be > 0")
        super().__init__(base)
        self.shift = base.shift * float(shift)
        self.two_log_s = 2.0 * math.log(shift)

    def logsnr(self, t: Tensor) -> Tensor:
        return self.base.logsnr(t) - self.two_log_s

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        return self.base.t_of_logsnr(logsnr + self.two_log_s)


class Scaled(Wrapper):
    """(α_t, σ_t) → (c_t α_t, c_t σ_t), λ unchanged (the blog, "DDIM is invariant to scaling").

    ``scale`` is ``None`` (c = 1), a positive number, ``"vp"`` (c = 1/√(α² + σ²), which turns any
    schedule into a VP one) or a callable c(t) of this schedule's t, differentiated by autograd; wrap
    the others around ``Scaled``, not inside it, and scale once.
    """

    def __init__(self, base: Schedule, scale: float | str | ScaleFn | None) -> None:
        number = isinstance(scale, int | float) and scale > 0
        if not (scale is None or number or scale == "vp" or callable(scale)):
            raise ValueError(f"schedule scale={scale!r}: allowed a positive number, 'vp' or a callable c(t)")
        if base.scale is not None:
            raise ValueError(f"schedule {base.name}: scale={scale!r} on a schedule scaled by {base.scale!r}")
        super().__init__(base)
        self.scale = scale

    def log_scale(self, t: Tensor, logsnr: Tensor, dlogsnr: Tensor) -> tuple[Tensor, Tensor]:
        if self.scale is None:
            return super().log_scale(t, logsnr, dlogsnr)
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
            return log_c, dlogc_dlam * dlogsnr
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            log_c = torch.log(self.scale(tt))
            (d,) = torch.autograd.grad(log_c.sum(), tt)
        return log_c.detach().expand_as(logsnr), d.expand_as(logsnr)


class Composed(Wrapper):
    """``Scaled(Shifted(Truncated(bare, logsnr_min, logsnr_max), shift), scale)``: the endpoints are
    given before the shift. The registry's classes below are this on their bare schedule."""

    def __init__(
        self,
        bare: Schedule,
        logsnr_min: float | None = None,
        logsnr_max: float | None = None,
        shift: float = 1.0,
        scale: float | str | ScaleFn | None = None,
    ) -> None:
        super().__init__(Scaled(Shifted(Truncated(bare, logsnr_min, logsnr_max), shift), scale))


# ---- bare schedules: shape and scaling in their own time, at their natural ends -----------------------
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


class BareCosine(VariancePreserving):
    """α = cos(πt/2), σ = sin(πt/2): λ(t) = −2 log tan(πt/2) (Nichol & Dhariwal 2021; blog)."""

    name = "cosine"

    def logsnr(self, t: Tensor) -> Tensor:
        # tan(π/2) is 1.6e16 in floating point: t = 1 is set to λ = −∞ (α = 0) exactly.
        lam = -2.0 * torch.log(torch.tan(0.5 * math.pi * t))
        return torch.where(t >= 1, -math.inf, lam)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return torch.where(t >= 1, -math.inf, -2.0 * math.pi / torch.sin(math.pi * t))

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * logsnr))


class BareLinear(VariancePreserving):
    """DDPM linear-β in continuous time (Song et al. 2021, VP-SDE):
    α² = exp(−β_min t − ½(β_max − β_min) t²), so λ(t) = −log expm1(β_min t + ½ β_d t²)."""

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"schedule linear: need 0 < beta_min={beta_min} < beta_max={beta_max}")
        self.beta_min, self.beta_d = float(beta_min), float(beta_max - beta_min)

    def _integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def logsnr(self, t: Tensor) -> Tensor:
        return -torch.log(torch.expm1(self._integral(t)))

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        b = self.beta_min + self.beta_d * t
        return -b / -torch.expm1(-self._integral(t))

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        c = softplus(-logsnr)  # log(1 + e^{-λ}) = ∫β
        return (torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * c) - self.beta_min) / self.beta_d


class BareFlow(Schedule):
    """Rectified flow / flow matching: α = 1 − t, σ = t, λ(t) = 2 log((1 − t)/t) (blog; SD3 §3.1).

    Scaling α + σ = 1: α = sigmoid(λ/2), σ = sigmoid(−λ/2).
    """

    name = "flow"

    def logsnr(self, t: Tensor) -> Tensor:
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return -2.0 / (t * (1.0 - t))

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * logsnr)

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        return logsigmoid(0.5 * logsnr)

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        return logsigmoid(-0.5 * logsnr)

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return 0.5 * torch.sigmoid(-0.5 * logsnr)

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return -0.5 * torch.sigmoid(0.5 * logsnr)


class BareEDM(Schedule):
    """Variance exploding (α = 1) with EDM's ρ-spaced σ (Karras et al. 2022, Eq. 5) between
    σ_min = e^{−λ_max/2} and σ_max = e^{−λ_min/2}:
    σ(t) = (σ_min^{1/ρ} + t (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ, λ = −2 log σ."""

    name = "edm"

    def __init__(self, logsnr_min: float, logsnr_max: float, rho: float = 7.0) -> None:
        lo, hi = float(logsnr_min), float(logsnr_max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"schedule edm: logsnr_min={lo}, logsnr_max={hi} must be finite")
        self.rho = float(rho)
        self._smin = math.exp(-0.5 * hi) ** (1 / self.rho)
        self._smax = math.exp(-0.5 * lo) ** (1 / self.rho)

    def logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * self.rho * torch.log(self._smin + t * (self._smax - self._smin))

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return -2.0 * self.rho * (self._smax - self._smin) / (self._smin + t * (self._smax - self._smin))

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        return (torch.exp(-0.5 * logsnr / self.rho) - self._smin) / (self._smax - self._smin)

    def log_alpha_of(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)

    def log_sigma_of(self, logsnr: Tensor) -> Tensor:
        return -0.5 * logsnr

    def dlog_alpha_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)

    def dlog_sigma_dlogsnr(self, logsnr: Tensor) -> Tensor:
        return torch.full_like(logsnr, -0.5)


# ---- the registry's classes: options logsnr_min, logsnr_max, shift, scale (``Composed``) ---------------
class Cosine(Composed):
    name = "cosine"

    def __init__(self, **options: Any) -> None:
        super().__init__(BareCosine(), **options)


class Linear(Composed):
    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, **options: Any) -> None:
        super().__init__(BareLinear(beta_min, beta_max), **options)


class Flow(Composed):
    name = "flow"

    def __init__(self, **options: Any) -> None:
        super().__init__(BareFlow(), **options)


class EDM(Composed):
    """Default endpoints EDM's σ_min = 0.002 and σ_max = 80."""

    name = "edm"

    def __init__(
        self,
        logsnr_min: float | None = None,
        logsnr_max: float | None = None,
        rho: float = 7.0,
        **options: Any,
    ) -> None:
        lo = -2 * math.log(80.0) if logsnr_min is None else logsnr_min
        hi = -2 * math.log(0.002) if logsnr_max is None else logsnr_max
        super().__init__(BareEDM(lo, hi, rho), logsnr_min=lo, logsnr_max=hi, **options)


SCHEDULES: Registry[Schedule] = Registry("schedule", Cosine, Linear, Flow, EDM)
build = SCHEDULES.build
