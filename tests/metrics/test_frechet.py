"""FrechetStats and frechet_distance against a direct scipy computation (Heusel et al. 2017's formula) and,
for fewer images than dimensions, an exact low-rank form."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusionflow.metrics import FrechetStats, frechet_distance
from diffusionflow.metrics.frechet import trace_sqrt_product

N, D = 500, 64


def features(seed: int, shift: float, scale: float) -> np.ndarray:
    """(N, D) correlated Gaussian features: mean ``shift``, a random mixing matrix times ``scale``."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    return shift + scale * rng.normal(size=(N, D)) @ mix


def direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """‖μx − μy‖² + Tr(Σx + Σy − 2 sqrtm(Σx Σy)) with np.cov and scipy.linalg.sqrtm."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_x @ s_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * covmean))


def stats_of(x: np.ndarray, cuts: tuple[int, ...] = ()) -> FrechetStats:
    stats = FrechetStats(x.shape[1])
    for part in np.split(x, cuts):
        stats.update(torch.from_numpy(part))
    return stats


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    return features(0, 0.0, 1.0), features(1, 0.3, 1.5)


def test_matches_scipy(xy: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = xy
    expected = direct_fid(x, y)
    (mu_x, s_x), (mu_y, s_y) = stats_of(x).mean_cov(), stats_of(y).mean_cov()
    np.testing.assert_allclose(mu_x, x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s_x, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)
    assert expected > 1.0
    assert frechet_distance(mu_x, s_x, mu_y, s_y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu_x, s_x, mu_x, s_x) == pytest.approx(0.0, abs=1e-8)


def test_fewer_images_than_dimensions() -> None:
    """20 < d images give a covariance Σ₁ of rank 19: the trace term against the exact low-rank form
    Tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ(B Σ₂ Bᵀ), Σ₁ = BᵀB with B = S V_rᵀ/√19 from the SVD of the centred features
    (its 19 non-zero singular values: a full-rank 19 × 19 eigenproblem), against scipy's sqrtm, and
    with the arguments swapped (Σ₁Σ₂ and Σ₂Σ₁ have the same eigenvalues; Σ₂ of 40 images has rank 39,
    and the 39 × 39 inner matrix of rank 19 leaves √(rounding) noise)."""
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    x, y = np.tanh(rng.normal(size=(20, D)) @ mix), np.tanh(0.2 + 1.3 * rng.normal(size=(40, D)) @ mix)
    (mu_x, s_x), (mu_y, s_y) = stats_of(x).mean_cov(), stats_of(y).mean_cov()
    _, sv, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    b = (sv[:19, None] * vt[:19]) / np.sqrt(19)
    assert sv[19] < 1e-10 * sv[0], "centred: rank 19"
    exact = np.sqrt(np.linalg.eigvalsh(b @ s_y @ b.T)).sum()
    assert trace_sqrt_product(s_x, s_y) == pytest.approx(exact, rel=1e-12)
    assert trace_sqrt_product(s_y, s_x) == pytest.approx(exact, rel=1e-7)
    fid = frechet_distance(mu_x, s_x, mu_y, s_y)
    assert fid == pytest.approx(direct_fid(x, y), rel=1e-6)
    assert fid == pytest.approx(frechet_distance(mu_y, s_y, mu_x, s_x), rel=1e-7)


def test_streaming_uneven_batches_equal_one_batch(xy: tuple[np.ndarray, np.ndarray]) -> None:
    x = xy[0]
    one, streamed = stats_of(x), stats_of(x, cuts=(1, 7, 100, 101, 392))
    assert streamed.count == one.count == N
    for a, b in zip(one.mean_cov(), streamed.mean_cov(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13)


def test_one_dimensional_closed_form() -> None:
    """For two 1-D Gaussians the Fréchet (W₂²) distance is (m₁ − m₂)² + (s₁ − s₂)²."""
    m1, s1, m2, s2 = 0.3, 1.7, -1.1, 0.4
    exact = (m1 - m2) ** 2 + (s1 - s2) ** 2
    assert frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]])) == (
        pytest.approx(exact, rel=1e-12)
    )
    rng = np.random.default_rng(3)
    a, b = rng.normal(m1, s1, size=(1000, 1)), rng.normal(m2, s2, size=(1000, 1))
    (mu_a, var_a), (mu_b, var_b) = stats_of(a).mean_cov(), stats_of(b).mean_cov()
    sample_exact = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(mu_a, var_a, mu_b, var_b) == pytest.approx(sample_exact, rel=1e-10)


def test_errors() -> None:
    stats = FrechetStats(3)
    with pytest.raises(ValueError, match="expected"):
        stats.update(torch.zeros(4, 2))
    stats.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
