"""Proposals p(λ): the density of training noise levels (Kingma & Gao 2023, "importance sampling").

Only the weighting w decides what the loss L = ½ ∫ w(λ) E‖ε̂ − ε‖² dλ is; the proposal p decides
the Monte-Carlo variance of its estimate ½ w(λ)/p(λ) ‖ε̂ − ε‖², λ ~ p. Every proposal samples by
its inverse CDF λ = F⁻¹(u), u ~ U(0, 1) (optionally stratified over the batch, as in k-diffusion),
and gives ``log_prob(λ)``. Sampling is done in float64 and cast to the default dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import schedules
from .registry import Registry
from .weightings import Weighting

__all__ = [
    "PROPOSALS",
    "Adaptive",
    "Binned",
    "CosMap",
    "LogNormal",
    "LogitNormal",
    "Mode",
    "NormalLogSNR",
    "Proposal",
    "UniformLogSNR",
    "UniformT",
    "WeightingProposal",
    "build",
]


class Proposal:
    """Base class: subclasses implement ``icdf(u)`` and ``log_prob(λ)``. ``needs`` names the run's
    components a subclass takes as arguments (``core.components.build`` supplies them)."""

    name = "proposal"
    needs: tuple[str, ...] = ()

    def __init__(self, stratified: bool = False) -> None:
        self.stratified = bool(stratified)

    def icdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def log_prob(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """n log-SNRs λ ~ p. Stratified: u_i = (π(i) + U_i)/n for a random permutation π."""
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        if self.stratified:
            u = (torch.randperm(n, generator=generator).to(torch.float64) + u) / n
        return self.icdf(u).to(device=device, dtype=torch.get_default_dtype())

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class UniformT(Proposal):
    """t ~ U(0, 1) under a schedule: λ = λ_t, p(λ) = 1/|dλ/dt| (K&G Eq. 7). Without a schedule of its
    own (``schedule: null`` in ``conf/proposal/uniform_t.yaml``) it takes the run's."""

    name = "uniform_t"
    needs = ("schedule",)

    def __init__(
        self, schedule: schedules.Schedule | str = "cosine", stratified: bool = False, **kwargs
    ) -> None:
        super().__init__(stratified)
        self.schedule = schedules.build(schedule, **kwargs) if isinstance(schedule, str) else schedule

    def icdf(self, u: Tensor) -> Tensor:
        return self.schedule.logsnr(u)

    def log_prob(self, logsnr: Tensor) -> Tensor:
        t = self.schedule.t_of_logsnr(logsnr)
        inside = (t >= 0) & (t <= 1)
        log_p = -torch.log(-self.schedule.dlogsnr_dt(t.clamp(0, 1)))
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))


class NormalLogSNR(Proposal):
    """λ ~ N(mean, std²)."""

    name = "normal_logsnr"

    def __init__(self, mean: float, std: float, stratified: bool = False) -> None:
        super().__init__(stratified)
        if not std > 0:
            raise ValueError(f"proposal {self.name}: std={std} must be > 0")
        self.mean, self.std = float(mean), float(std)

    def icdf(self, u: Tensor) -> Tensor:
        return self.mean + self.std * math.sqrt(2) * torch.erfinv(2 * u - 1)

    def log_prob(self, logsnr: Tensor) -> Tensor:
        return -0.5 * ((logsnr - self.mean) / self.std) ** 2 - math.log(self.std * math.sqrt(2 * math.pi))


class LogitNormal(NormalLogSNR):
    """SD3's logit-normal t (Esser et al. 2024, Eq. 19): t = sigmoid(u), u ~ N(m, s²) on the flow
    schedule, where λ = −2 logit(t); so λ ~ N(−2m, (2s)²). A resolution shift s' adds log s' to m."""

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0, stratified: bool = False) -> None:
        super().__init__(-2 * m, 2 * s, stratified)


class LogNormal(NormalLogSNR):
    """EDM's training σ (Karras et al. 2022, §5): ln σ̃ ~ N(P_mean, P_std²), λ = −2 ln σ̃."""

    name = "log_normal"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, stratified: bool = False) -> None:
        super().__init__(-2 * P_mean, 2 * P_std, stratified)


class UniformLogSNR(Proposal):
    """λ ~ U(λ_min, λ_max)."""

    name = "uniform_logsnr"

    def __init__(self, logsnr_min: float = -15.0, logsnr_max: float = 15.0, stratified: bool = False) -> None:
        super().__init__(stratified)
        if not logsnr_min < logsnr_max:
            raise ValueError(
                f"proposal {self.name}: logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}"
            )
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)

    def icdf(self, u: Tensor) -> Tensor:
        return self.logsnr_min + u * (self.logsnr_max - self.logsnr_min)

    def log_prob(self, logsnr: Tensor) -> Tensor:
        inside = (logsnr >= self.logsnr_min) & (logsnr <= self.logsnr_max)
        log_p = torch.full_like(logsnr, -math.log(self.logsnr_max - self.logsnr_min))
        return torch.where(inside, log_p, torch.full_like(logsnr, -math.inf))


def _flow_logsnr(t: Tensor) -> Tensor:
    """λ of flow time t (α = 1 − t, σ = t)."""
    return 2 * (torch.log1p(-t) - torch.log(t))


def _flow_log_dt_dlogsnr(logsnr: Tensor) -> Tensor:
    """log |dt/dλ| = log(t(1 − t)/2) on the flow schedule."""
    t = torch.sigmoid(-0.5 * logsnr)
    return torch.log(t) + torch.log1p(-t) - math.log(2)


class CosMap(Proposal):
    """SD3's CosMap (Esser et al. 2024, §3.1): t = 1 − 1/(tan(πu/2) + 1) on the flow schedule,
    i.e. λ = −2 log tan(πu/2): the density of uniform t under the cosine schedule,
    p(λ) = sech(λ/2)/(2π)."""

    name = "cosmap"

    def icdf(self, u: Tensor) -> Tensor:
        return -2 * torch.log(torch.tan(0.5 * math.pi * u))

    def log_prob(self, logsnr: Tensor) -> Tensor:
        return -torch.log(2 * math.pi * torch.cosh(0.5 * logsnr))


class Mode(Proposal):
    """SD3's mode sampling with heavy tails (Esser et al. 2024, Eq. 20):
    t = f(u) = 1 − u − s (cos²(πu/2) − 1 + u), u ~ U(0, 1), on the flow schedule."""

    name = "mode"

    def __init__(self, s: float = 1.29, stratified: bool = False) -> None:
        super().__init__(stratified)
        if not -1 <= s <= 2 / (math.pi - 2):
            raise ValueError(f"proposal mode: s={s} must be in [-1, 2/(π-2)] for f to be monotone")
        self.s = float(s)

    def _f(self, u: Tensor) -> Tensor:
        return 1 - u - self.s * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)

    def icdf(self, u: Tensor) -> Tensor:
        return _flow_logsnr(self._f(u))

    def log_prob(self, logsnr: Tensor) -> Tensor:
        t = torch.sigmoid(-0.5 * logsnr.to(torch.float64))
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):  # f is decreasing: bisection to float64 precision
            mid = 0.5 * (lo + hi)
            above = self._f(mid) > t
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        u = 0.5 * (lo + hi)
        df_du = -1 - self.s * (1 - 0.5 * math.pi * torch.sin(math.pi * u))
        log_p = -torch.log(-df_du) + _flow_log_dt_dlogsnr(logsnr.to(torch.float64))
        return log_p.to(logsnr.dtype)


class Binned(Proposal):
    """A piecewise-constant density on bins of [λ_min, λ_max] with given masses, sampled exactly by
    its inverse CDF. Base of ``weighting`` and ``adaptive``."""

    def __init__(self, logsnr_min: float, logsnr_max: float, bins: int, stratified: bool = False) -> None:
        super().__init__(stratified)
        if not logsnr_min < logsnr_max:
            raise ValueError(
                f"proposal {self.name}: logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}"
            )
        if bins < 1:
            raise ValueError(f"proposal {self.name}: bins={bins} must be >= 1")
        self.logsnr_min, self.logsnr_max, self.bins = float(logsnr_min), float(logsnr_max), int(bins)
        self.edges = torch.linspace(self.logsnr_min, self.logsnr_max, self.bins + 1, dtype=torch.float64)
        self.centres = 0.5 * (self.edges[1:] + self.edges[:-1])
        self.masses = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)

    def set_masses(self, masses: Tensor) -> None:
        masses = masses.to(torch.float64).clamp_min(0)
        if not masses.sum() > 0:
            raise ValueError(f"proposal {self.name}: all bin masses are zero")
        self.masses = masses / masses.sum()

    def icdf(self, u: Tensor) -> Tensor:
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.masses, 0)])
        cdf[-1] = 1.0
        i = torch.searchsorted(cdf, u.to(torch.float64), right=True).clamp(1, self.bins) - 1
        frac = ((u - cdf[i]) / self.masses[i].clamp_min(1e-300)).clamp(0, 1)
        return self.edges[i] + frac * (self.edges[i + 1] - self.edges[i])

    def bin_index(self, logsnr: Tensor) -> Tensor:
        i = torch.searchsorted(self.edges, logsnr.detach().to(torch.float64).cpu(), right=True) - 1
        return i.clamp(0, self.bins - 1)

    def log_prob(self, logsnr: Tensor) -> Tensor:
        width = (self.logsnr_max - self.logsnr_min) / self.bins
        log_p = torch.log(self.masses[self.bin_index(logsnr)] / width).to(logsnr)
        inside = (logsnr >= self.logsnr_min) & (logsnr <= self.logsnr_max)
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))


class WeightingProposal(Binned):
    """p ∝ w on a grid of bins (so w/p is nearly constant: every noise level costs the same)."""

    name = "weighting"
    needs = ("weighting",)

    def __init__(
        self,
        weighting: Weighting,
        logsnr_min: float = -15.0,
        logsnr_max: float = 15.0,
        bins: int = 1000,
        stratified: bool = False,
    ) -> None:
        super().__init__(logsnr_min, logsnr_max, bins, stratified)
        self.weighting = weighting
        self.set_masses(weighting(self.centres))


class Adaptive(WeightingProposal):
    """Kingma & Gao's adaptive noise schedule (2023, §5 and App. F): p(λ) ∝ w(λ) E[‖ε̂ − ε‖² | λ],
    estimated per bin by an exponential moving average (``decay``) of the ε-MSE seen in training;
    before any training it is p ∝ w. Options as for ``WeightingProposal``, 100 bins by default."""

    name = "adaptive"

    def __init__(self, weighting: Weighting, bins: int = 100, decay: float = 0.999, **options: Any) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"proposal adaptive: decay={decay} must be in [0, 1)")
        super().__init__(weighting, bins=bins, **options)
        self.decay = float(decay)
        self.loss_ema = torch.ones(self.bins, dtype=torch.float64)
        self._refresh()

    def _refresh(self) -> None:
        self.set_masses(self.weighting(self.centres) * self.loss_ema)

    def bin_statistics(self, logsnr: Tensor, eps_mse: Tensor) -> tuple[Tensor, Tensor]:
        """Per-bin sums of ε-MSE and counts for a batch (to be all-reduced under DDP)."""
        i = self.bin_index(logsnr)
        values = eps_mse.detach().to(torch.float64).cpu()
        sums = torch.bincount(i, weights=values, minlength=self.bins)
        counts = torch.bincount(i, minlength=self.bins).to(torch.float64)
        return sums, counts

    def update(self, sums: Tensor, counts: Tensor) -> None:
        """EMA step on the bins that received samples, then p ∝ w · EMA."""
        seen = counts > 0
        means = sums[seen] / counts[seen]
        self.loss_ema[seen] = self.decay * self.loss_ema[seen] + (1 - self.decay) * means
        self._refresh()

    def state_dict(self) -> dict[str, Tensor]:
        return {"loss_ema": self.loss_ema.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.loss_ema = state["loss_ema"].to(torch.float64).clone()
        self._refresh()


PROPOSALS: Registry[Proposal] = Registry(
    "proposal", UniformT, LogitNormal, LogNormal, UniformLogSNR, CosMap, Mode, WeightingProposal, Adaptive
)
build = PROPOSALS.build
