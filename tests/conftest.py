"""Shared fixtures: float64 by default for core tests, a small 2-D Gaussian mixture."""

from __future__ import annotations

import pytest
import torch

from diffusionflow.core.oracle import GaussianMixture
from helpers import make_mixture


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def gmm(f64) -> GaussianMixture:
    return make_mixture()
