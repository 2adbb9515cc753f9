"""Kernel Inception Distance and Inception Score from features, as torch-fidelity computes them.

* KID (Bińkowski et al. 2018): the unbiased estimator of MMD² with the polynomial kernel
  k(x, y) = (γ xᵀy + c₀)^d, γ = 1/dim by default, averaged over ``subsets`` random subsets of
  ``subset_size`` features drawn without replacement from each side. torch-fidelity's
  ``metric_kid.py`` (after Bińkowski's MMD-GAN code): same defaults (100 subsets of 1000, d = 3,
  c₀ = 1), same ``np.random.RandomState(2020)`` drawing the first argument's subset before the
  second's, the same order of sums, so ``kernel_inception_distance(a, b)`` is its KID with
  ``input1 = a, input2 = b``. Like torch-fidelity, the kernels are evaluated in the features' dtype:
  float32 Inception features give float32 sums, whose rounding is ~1e-3 of KID when KID ≈ 1e-5
  (far below the spread over subsets); pass ``feat.double()`` for float64.
* IS (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) on each of ``splits`` chunks, mean and std
  over chunks, from torch-fidelity's ``logits_unbiased`` (the fc layer without bias), after its
  seeded shuffle (``metric_isc.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["inception_score", "kernel_inception_distance"]

SEED = 2020  # torch-fidelity's default rng_seed


def _as_numpy(features: Tensor | np.ndarray, what: str) -> np.ndarray:
    """A 2-D numpy array in the features' floating dtype (float64 for integers)."""
    f = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"{what} must be (N, dim), got shape {f.shape}")
    return f if f.dtype.kind == "f" else f.astype(np.float64)


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD² of two equal-size samples: the mean of k over distinct pairs within each sample
    minus twice the mean of k over all cross pairs (summed in torch-fidelity's ``mmd2`` order)."""
    m = len(x)
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within_x = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    within_y = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    cross = k_xy.sum(axis=0).sum()
    return float((within_x + within_y) / (m * (m - 1)) - 2 * cross / (m * m))


def kernel_inception_distance(
    feat_real: Tensor | np.ndarray,
    feat_fake: Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = SEED,
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD² over random subsets; torch-fidelity's KID
    with ``input1 = feat_real``, ``input2 = feat_fake`` and the same ``kid_*`` settings."""
    x, y = _as_numpy(feat_real, "feat_real"), _as_numpy(feat_fake, "feat_fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if subset_size < 2 or subset_size > min(len(x), len(y)):
        raise ValueError(
            f"KID subset_size {subset_size} must be in [2, min(#real, #fake)] = [2, {min(len(x), len(y))}]"
        )
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        xs = x[rng.choice(len(x), subset_size, replace=False)]
        ys = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = _unbiased_mmd2(xs, ys, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


def inception_score(
    logits: Tensor, splits: int = 10, shuffle: bool = True, seed: int = SEED
) -> tuple[float, float]:
    """(mean, std) over ``splits`` chunks of exp(mean KL(p(y|x) ‖ p̂(y))), p = softmax(logits) in
    float64, p̂ the chunk's mean; torch-fidelity's ISC from ``logits_unbiased`` (``isc_splits``)."""
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"logits must be (N, classes) with N ≥ splits = {splits}, got {tuple(logits.shape)}")
    n = len(logits)
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(logits.device)]
    p, log_p = logits.double().softmax(dim=1), logits.double().log_softmax(dim=1)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_q = p[rows].mean(dim=0, keepdim=True).log()
        scores.append((p[rows] * (log_p[rows] - log_q)).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
