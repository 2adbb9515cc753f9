"""The exact Gaussian-mixture oracle: ground truth for tests, figures and toy metrics.

Data x ~ Σ_k π_k N(μ_k, Σ_k). Under any schedule the noisy marginal is again a mixture,
p_t(z) = Σ_k π_k N(z; α_t μ_k, C_k), C_k = α_t² Σ_k + σ_t² I, and everything is in closed form
(Bishop 2006, §2.3.3 for the Gaussian conditionals):

    r_k(z)      = π_k N(z; α μ_k, C_k) / p_t(z)                       (responsibilities)
    E[x | z, k] = μ_k + α Σ_k C_k⁻¹ (z − α μ_k)
    x̂(z)        = Σ_k r_k(z) E[x | z, k]
    ∇ log p_t   = −Σ_k r_k(z) C_k⁻¹ (z − α μ_k),   ε̂ = −σ ∇ log p_t (Tweedie)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["GaussianMixture"]


def _log_normal(diff: Tensor, chol: Tensor) -> Tensor:
    """log N(diff; 0, L Lᵀ) for diff (..., D) and Cholesky factors L (..., D, D)."""
    white = torch.linalg.solve_triangular(chol, diff.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (white.pow(2).sum(-1) + logdet + diff.shape[-1] * math.log(2 * math.pi))


class GaussianMixture:
    """Σ_k π_k N(μ_k, Σ_k) in D dimensions: means (K, D), covariances (K, D, D), weights (K,)."""

    def __init__(self, means: Tensor, covariances: Tensor, weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means)
        covariances = torch.as_tensor(covariances, dtype=means.dtype)
        k, d = means.shape
        if covariances.shape != (k, d, d):
            raise ValueError(f"covariances has shape {tuple(covariances.shape)}, expected {(k, d, d)}")
        weights = (
            torch.full((k,), 1.0 / k, dtype=means.dtype) if weights is None else torch.as_tensor(weights)
        )
        if weights.shape != (k,) or (weights < 0).any():
            raise ValueError(f"weights must be {k} non-negative numbers, got {weights.tolist()}")
        self.means = means
        self.covariances = covariances
        self.weights = weights.to(means.dtype) / weights.sum()
        self._chol = torch.linalg.cholesky(covariances)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return GaussianMixture(self.means.to(dtype), self.covariances.to(dtype), self.weights.to(dtype))

    # ---- sampling -----------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples x ~ p_data, (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return self.means[k] + (self._chol[k] @ noise.unsqueeze(-1)).squeeze(-1)

    def sample_t(
        self, n: int, t: float | Tensor, sched: Schedule, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples z_t = α_t x + σ_t ε."""
        x = self.sample(n, generator)
        eps = torch.randn(x.shape, dtype=x.dtype, generator=generator)
        o = sched(torch.as_tensor(t, dtype=x.dtype))
        return o.alpha * x + o.sigma * eps

    # ---- posterior quantities -----------------------------------------------------------------
    def _posterior(self, z: Tensor, t: Tensor | float, sched: Schedule) -> tuple[Tensor, ...]:
        """Responsibilities r (B, K), C⁻¹(z − αμ) (B, K, D), log N terms (B, K), α, σ (B, 1, 1)."""
        t = torch.as_tensor(t, dtype=z.dtype).reshape(-1)  # one t for all, or one per sample
        o = sched(t)
        alpha, sigma = o.alpha.reshape(-1, 1, 1, 1), o.sigma.reshape(-1, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=z.dtype)
        chol = torch.linalg.cholesky(alpha**2 * self.covariances + sigma**2 * eye)  # (1 or B, K, D, D)
        diff = z[:, None, :] - alpha[..., 0] * self.means  # (B, K, D)
        chol_b = chol.expand(z.shape[0], *chol.shape[1:])
        prec_diff = torch.cholesky_solve(diff.unsqueeze(-1), chol_b).squeeze(-1)
        log_joint = torch.log(self.weights) + _log_normal(diff, chol_b)
        r = torch.softmax(log_joint, dim=-1)
        batch = (z.shape[0], 1, 1)
        return r, prec_diff, log_joint, alpha[..., 0].expand(batch), sigma[..., 0].expand(batch)

    def x_hat(self, z: Tensor, t: Tensor | float, sched: Schedule) -> Tensor:
        """E[x | z_t = z] (B, D)."""
        r, prec_diff, _, alpha, _ = self._posterior(z, t, sched)
        cond_mean = self.means + alpha * (self.covariances @ prec_diff.unsqueeze(-1)).squeeze(-1)
        return (r.unsqueeze(-1) * cond_mean).sum(1)

    def score(self, z: Tensor, t: Tensor | float, sched: Schedule) -> Tensor:
        """∇_z log p_t(z) (B, D)."""
        r, prec_diff, *_ = self._posterior(z, t, sched)
        return -(r.unsqueeze(-1) * prec_diff).sum(1)

    def eps_hat(self, z: Tensor, t: Tensor | float, sched: Schedule) -> Tensor:
        """E[ε | z_t = z] = −σ_t ∇ log p_t(z) (B, D)."""
        r, prec_diff, _, _, sigma = self._posterior(z, t, sched)
        return sigma[:, :, 0] * (r.unsqueeze(-1) * prec_diff).sum(1)

    def log_prob(self, z: Tensor, t: Tensor | float, sched: Schedule) -> Tensor:
        """log p_t(z) (B,)."""
        _, _, log_joint, _, _ = self._posterior(z, t, sched)
        return torch.logsumexp(log_joint, dim=-1)

    def log_prob_data(self, x: Tensor) -> Tensor:
        """log p_data(x) (B,), the t = 0 density without any schedule."""
        log_n = _log_normal(x[:, None, :] - self.means, self._chol)
        return torch.logsumexp(torch.log(self.weights) + log_n, dim=-1)

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> Tensor:
        """Total covariance Σ_k π_k (Σ_k + μ_k μ_kᵀ) − μ μᵀ."""
        m = self.mean()
        outer = self.means[:, :, None] * self.means[:, None, :]
        second = (self.weights[:, None, None] * (self.covariances + outer)).sum(0)
        return second - m[:, None] * m[None, :]
