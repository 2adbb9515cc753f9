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


def no_network(*args: object, **kwargs: object) -> None:
    pytest.fail(f"network access attempted: {args}")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way torch-fidelity, torch.hub and torchvision reach the network fails the test."""
    import urllib.request

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    import torchvision

    for target, name in [
        (urllib.request, "urlopen"),
        (torch.hub, "load"),
        (torch.hub, "load_state_dict_from_url"),
        (torch.hub, "download_url_to_file"),
        (torchvision.models._api, "load_state_dict_from_url"),
        (tf_inception, "load_state_dict_from_url"),
    ]:
        monkeypatch.setattr(target, name, no_network)
