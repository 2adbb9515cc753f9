"""Fréchet distance between Gaussians fitted to features, from streaming float64 sums.

FID (Heusel et al. 2017): d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}). The statistics are kept
as sums (Σf, Σffᵀ, n) in float64 (EDM's ``fid.py`` does the same), so memory does not grow with the
number of images and, under DDP, the sums are all-reduced — never the features gathered. The
covariance is the unbiased one, Σ = (Σffᵀ − n μμᵀ)/(n − 1), as in torch-fidelity and pytorch-fid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FrechetStats", "frechet_distance"]


class FrechetStats:
    """Running Σf, Σffᵀ and n of feature vectors of dimension ``dim`` (float64)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> None:
        """Adds a batch (N, dim) of features."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features have shape {tuple(features.shape)}, expected (N, {self.dim})")
        f = features.to(device=self.sum.device, dtype=torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.n += f.shape[0]

    def all_reduce(self) -> None:
        """Sums the statistics over all processes (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.sum, self.outer, self.n):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    @property
    def count(self) -> int:
        return int(self.n.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ and the unbiased Σ, as float64 numpy arrays."""
        n = self.n.item()
        if n < 2:
            raise ValueError(f"Fréchet statistics need at least 2 feature vectors, got {int(n)}")
        mu = (self.sum / n).cpu().numpy()
        cov = ((self.outer - n * torch.outer(self.sum / n, self.sum / n)) / (n - 1)).cpu().numpy()
        return mu, cov

    def save(self, path: Path, **meta: str | int) -> None:
        """``.npz`` with mu, sigma, n and string/int metadata (the cache key)."""
        mu, cov = self.mean_cov()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=cov, n=self.count, **meta)
        tmp.replace(path)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁Σ₂)^{1/2}.

    Tr (Σ₁Σ₂)^{1/2} = Tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}: the same eigenvalues, of a symmetric PSD matrix,
    so two symmetric eigendecompositions (``eigh``) replace torch-fidelity's general ``eigvals``
    (about 2× faster at 2048-d; rounding-level negative eigenvalues are clipped). The tests check it
    against scipy's ``sqrtm`` and torch-fidelity."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}"
        )
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
