"""Network output parameterisations: ε, x, v, flow velocity u and EDM's F.

Every output is linear in (x, ε) (the blog, "Network output"): target = A_t x + B_t ε. With
z = α x + σ ε this is a 2×2 linear system, so for any output

    x̂ = (B z − σ out) / (α B − σ A),      ε̂ = (α out − A z) / (α B − σ A),

and since x̂ − x = −(σ/α)(ε̂ − ε) at fixed z,

    ‖out − target‖² = ((α B − σ A)/α)² ‖ε̂ − ε‖²        (the blog's MSE table; math.md §1.2).

Each class below only states (A_t, B_t); the conversions are shared. The network sees
z_in = c_in z with c_in = 1/√(α² σ_d² + σ²), i.e. unit variance when Var(x) = σ_d² (EDM Table 1,
written on z rather than z/α, which makes the input invariant to scaling the schedule), and the
noise conditioning c_noise = −λ/8 = ¼ log σ̃ (EDM's c_noise), shared by all outputs so one network
can be driven by any schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

__all__ = ["EDM", "PREDICTIONS", "Eps", "Flow", "Prediction", "V", "X", "build"]

LOGSNR_CLAMP = 60.0
"""|λ| bound before c_noise: the ends t = 0, 1 of cosine/flow schedules have λ = ±∞."""


class Prediction:
    """Base class: subclasses give ``coefficients(alpha, sigma) -> (A, B)`` with target = A x + B ε."""

    name = "prediction"

    def __init__(self, sigma_data: float = 1.0) -> None:
        if not sigma_data > 0:
            raise ValueError(f"prediction {self.name}: sigma_data={sigma_data} must be > 0")
        self.sigma_data = float(sigma_data)

    def coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _det(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, b = self.coefficients(alpha, sigma)
        return a, b, alpha * b - sigma * a

    def target(self, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The regression target A x + B ε."""
        a, b = self.coefficients(alpha, sigma)
        return a * x + b * eps

    def to_x_eps(self, out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Raw network output → (x̂, ε̂) by solving z = α x̂ + σ ε̂, out = A x̂ + B ε̂."""
        a, b, det = self._det(alpha, sigma)
        return (b * z - sigma * out) / det, (alpha * out - a * z) / det

    def from_x_eps(self, x_hat: Tensor, eps_hat: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """(x̂, ε̂) → the output this parameterisation would have produced."""
        return self.target(x_hat, eps_hat, alpha, sigma)

    def mse_factor(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """((α B − σ A)/α)²: ‖out − target‖² = mse_factor · ‖ε̂ − ε‖²."""
        _, _, det = self._det(alpha, sigma)
        return (det / alpha) ** 2

    def c_in(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """1/√(α² σ_d² + σ²) (EDM Table 1 c_in, on z)."""
        return torch.rsqrt(alpha**2 * self.sigma_data**2 + sigma**2)

    def c_noise(self, logsnr: Tensor) -> Tensor:
        """−λ/8 = ¼ log σ̃ (EDM Table 1 c_noise), λ clamped to ±LOGSNR_CLAMP."""
        return -logsnr.clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP) / 8.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_data={self.sigma_data})"


class Eps(Prediction):
    """ε-prediction (Ho et al. 2020): A = 0, B = 1. x̂ = (z − σ ε̂)/α fails where α = 0."""

    name = "eps"

    def coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(alpha), torch.ones_like(alpha)


class X(Prediction):
    """x-prediction: A = 1, B = 0. ε̂ = (z − α x̂)/σ fails where σ = 0; ‖x̂ − x‖² = e^{−λ}‖ε̂ − ε‖²."""

    name = "x"

    def coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(alpha), torch.zeros_like(alpha)


class V(Prediction):
    """v = α ε − σ x (Salimans & Ho 2022): A = −σ, B = α; ‖v̂ − v‖² = α²(1 + e^{−λ})²‖ε̂ − ε‖²."""

    name = "v"

    def coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return -sigma, alpha


class Flow(Prediction):
    """Flow-matching velocity u = ε − x (Lipman et al. 2023; Liu et al. 2023): A = −1, B = 1;
    ‖û − u‖² = (1 + e^{−λ/2})²‖ε̂ − ε‖². With α = 1 − t, σ = t, u = dz/dt."""

    name = "flow"

    def coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(alpha), torch.ones_like(alpha)


class EDM(Prediction):
    """EDM preconditioning (Karras et al. 2022, Table 1) on z̃ = z/α, σ̃ = σ/α:
    D = c_skip z̃ + c_out F, c_skip = σ_d²/(σ̃² + σ_d²), c_out = σ̃ σ_d/√(σ̃² + σ_d²).

    F's target is (x − c_skip z̃)/c_out = ((1 − c_skip) x − c_skip σ̃ ε)/c_out, i.e.
    A = (1 − c_skip)/c_out, B = −c_skip σ̃/c_out, written without dividing by α.
    EDM's loss weight (σ̃² + σ_d²)/(σ̃ σ_d)² on ‖D − x‖² makes the F-MSE unit-weight.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        super().__init__(sigma_data)

    def coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        sd2 = self.sigma_data**2
        norm = torch.sqrt(sigma**2 + alpha**2 * sd2)  # = α √(σ̃² + σ_d²)
        # A = σ̃ / (σ_d √(σ̃² + σ_d²)),  B = −σ_d / √(σ̃² + σ_d²), multiplied through by α.
        return sigma / (self.sigma_data * norm), -alpha * self.sigma_data / norm

    def c_skip(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """c_skip on z̃ (EDM Table 1)."""
        return self.sigma_data**2 * alpha**2 / (sigma**2 + alpha**2 * self.sigma_data**2)

    def c_out(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """c_out (EDM Table 1): σ̃ σ_d/√(σ̃² + σ_d²) = σ σ_d / √(σ² + α² σ_d²)."""
        return sigma * self.sigma_data / torch.sqrt(sigma**2 + alpha**2 * self.sigma_data**2)


PREDICTIONS: Registry[Prediction] = Registry("prediction", Eps, X, V, Flow, EDM)
build = PREDICTIONS.build
