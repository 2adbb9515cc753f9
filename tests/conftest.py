"""Shared fixtures: float64 by default for core tests, a small 2-D Gaussian mixture."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets: one thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Shared by the session's test modules: the digits classifier trains once."""
    path = tmp_path_factory.getbasetemp() / "diffusionflow-cache"
    path.mkdir(exist_ok=True)
    return path
