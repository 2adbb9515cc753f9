"""Loss weightings w(λ) over log-SNR (Kingma & Gao 2023; SD3, Esser et al. 2024, §3.1).

The loss is L = ½ E_{λ~p}[ w(λ)/p(λ) ‖ε̂ − ε‖² ] (see ``objective``). Each weighting is normalised
so that, with its paper's own proposal p and output parameterisation, that expression *equals the
paper's plain loss* per sample (SD3 writes the same convention as L_w = −½ E_t[w_t λ'_t ‖ε̂ − ε‖²],
e.g. w_t^RF = t/(1 − t) for rectified flow). ``canonical()`` names that proposal and prediction.

With uniform t, p(λ) = 1/|λ'_t|: cosine p = sech(λ/2)/(2π), flow p = sech²(λ/4)/8 (math.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .registry import Registry

__all__ = [
    "EDM",
    "ELBO",
    "IDDPM",
    "SD3",
    "WEIGHTINGS",
    "Canonical",
    "CosineV",
    "FlowWeighting",
    "MinSNR",
    "Sigmoid",
    "Weighting",
    "build",
]


@dataclass(frozen=True)
class Canonical:
    """The training setup of a weighting's paper: schedule, prediction and proposal, by name with options."""

    schedule: str
    prediction: str
    proposal: str
    prediction_kwargs: dict = field(default_factory=dict)
    proposal_kwargs: dict = field(default_factory=dict)


def normal_pdf(x: Tensor, mean: float, std: float) -> Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


class Weighting:
    """w(λ) ≥ 0. Subclasses implement ``__call__`` and ``canonical``."""

    name = "weighting"

    def __call__(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def canonical(self) -> Canonical:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class ELBO(Weighting):
    """w = 1: the continuous-time VDM bound, L = −½ E_t[λ'_t ‖ε̂ − ε‖²] (Kingma et al. 2021, Eq. 17).

    Canonical setup: VDM's fixed schedule, log-SNR linear in t, i.e. λ ~ U(λ_min, λ_max) with constant
    w/p, on [−15, 15] (VDM's [−5, 13.3] is sized for 8-bit images). The bound needs a bounded range:
    on an untruncated schedule ∫ w dλ diverges (at high SNR the ε-MSE tends to a constant), and uniform
    t on the cosine schedule gives w/p = 2π cosh(λ/2), unbounded — training on it did not converge."""

    name = "elbo"

    def __call__(self, logsnr: Tensor) -> Tensor:
        return torch.ones_like(logsnr)

    def canonical(self) -> Canonical:
        return Canonical("cosine", "eps", "uniform_logsnr")


class IDDPM(Weighting):
    """ε-MSE under the cosine schedule with uniform t (Nichol & Dhariwal 2021):
    w = sech(λ/2)/π = 2 p_cosine(λ) (K&G Table 1; SD3 §3.1)."""

    name = "iddpm"

    def __call__(self, logsnr: Tensor) -> Tensor:
        return 1.0 / (math.pi * torch.cosh(0.5 * logsnr))

    def canonical(self) -> Canonical:
        return Canonical("cosine", "eps", "uniform_t", proposal_kwargs={"schedule": "cosine"})


class EDM(Weighting):
    """EDM (Karras et al. 2022, Eq. 8 + Table 1): ln σ̃ ~ N(P_mean, P_std²), i.e.
    λ ~ N(−2 P_mean, (2 P_std)²), loss weight (σ̃² + σ_d²)/(σ̃ σ_d)² on ‖D − x‖².
    w = 2 N(λ; −2P_mean, (2P_std)²) (e^{−λ} + σ_d²)/σ_d² (SD3 §3.1 "EDM")."""

    name = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> None:
        if not (P_std > 0 and sigma_data > 0):
            raise ValueError(f"weighting edm: need P_std={P_std} > 0 and sigma_data={sigma_data} > 0")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def __call__(self, logsnr: Tensor) -> Tensor:
        sd2 = self.sigma_data**2
        density = normal_pdf(logsnr, -2 * self.P_mean, 2 * self.P_std)
        return 2 * density * (torch.exp(-logsnr) + sd2) / sd2

    def canonical(self) -> Canonical:
        return Canonical(
            "edm",
            "edm",
            "log_normal",
            prediction_kwargs={"sigma_data": self.sigma_data},
            proposal_kwargs={"P_mean": self.P_mean, "P_std": self.P_std},
        )


class SD3(Weighting):
    """Rectified flow with logit-normal t (SD3, Esser et al. 2024, Eq. 19 and §3.1):
    t = sigmoid(u), u ~ N(m, s²) gives λ = −2u ~ N(−2m, (2s)²); w = 2 N(λ; −2m, (2s)²)(1 + e^{−λ/2})²."""

    name = "sd3"

    def __init__(self, m: float = 0.0, s: float = 1.0) -> None:
        if not s > 0:
            raise ValueError(f"weighting sd3: s={s} must be > 0")
        self.m, self.s = float(m), float(s)

    def __call__(self, logsnr: Tensor) -> Tensor:
        return 2 * normal_pdf(logsnr, -2 * self.m, 2 * self.s) * (1 + torch.exp(-0.5 * logsnr)) ** 2

    def canonical(self) -> Canonical:
        return Canonical("flow", "flow", "logit_normal", proposal_kwargs={"m": self.m, "s": self.s})


class FlowWeighting(Weighting):
    """Flow matching / rectified flow, uniform t, α = 1 − t, σ = t: w = t/(1 − t) = e^{−λ/2}
    (SD3 §3.1 w_t^RF; K&G App. D)."""

    name = "flow"

    def __call__(self, logsnr: Tensor) -> Tensor:
        return torch.exp(-0.5 * logsnr)

    def canonical(self) -> Canonical:
        return Canonical("flow", "flow", "uniform_t", proposal_kwargs={"schedule": "flow"})


class CosineV(Weighting):
    """v-MSE under the cosine schedule with uniform t (Salimans & Ho 2022):
    w = (2/π) e^{−λ/2}, the flow weighting times 2/π (K&G App. D)."""

    name = "cosine_v"

    def __call__(self, logsnr: Tensor) -> Tensor:
        return (2 / math.pi) * torch.exp(-0.5 * logsnr)

    def canonical(self) -> Canonical:
        return Canonical("cosine", "v", "uniform_t", proposal_kwargs={"schedule": "cosine"})


class Sigmoid(Weighting):
    """w = sigmoid(b − λ), monotone (Kingma & Gao 2023, §4; used with ε-prediction and the
    adaptive noise schedule of their §5)."""

    name = "sigmoid"

    def __init__(self, b: float = 0.0) -> None:
        self.b = float(b)

    def __call__(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(self.b - logsnr)

    def canonical(self) -> Canonical:
        return Canonical("cosine", "eps", "adaptive")


class MinSNR(Weighting):
    """Min-SNR-γ (Hang et al. 2023): ε-MSE weighted min(SNR, γ)/SNR under the cosine schedule with
    uniform t: w = (sech(λ/2)/π) · min(1, γ e^{−λ})."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"weighting min_snr: gamma={gamma} must be > 0")
        self.gamma = float(gamma)

    def __call__(self, logsnr: Tensor) -> Tensor:
        return IDDPM()(logsnr) * torch.clamp(self.gamma * torch.exp(-logsnr), max=1.0)

    def canonical(self) -> Canonical:
        return Canonical("cosine", "eps", "uniform_t", proposal_kwargs={"schedule": "cosine"})


WEIGHTINGS: Registry[Weighting] = Registry(
    "weighting", ELBO, IDDPM, EDM, SD3, FlowWeighting, CosineV, Sigmoid, MinSNR
)
build = WEIGHTINGS.build
