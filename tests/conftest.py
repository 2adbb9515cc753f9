"""Shared fixtures: float64 by default for core tests, a small 2-D Gaussian mixture."""

from __future__ import annotations

import pytest
import torch

from diffusionflow.core.oracle import GaussianMixture


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_mixture(dim: int = 2, components: int = 3, seed: int = 0) -> GaussianMixture:
    """A seeded mixture with full covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(components, dim, generator=g, dtype=torch.float64)
    a = torch.randn(components, dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    covs = 0.3 * a @ a.transpose(-1, -2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, covs, weights)


@pytest.fixture
def gmm(f64) -> GaussianMixture:
    return make_mixture()
