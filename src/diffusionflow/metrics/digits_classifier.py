"""A small CNN trained on scikit-learn's digits: the feature extractor of ``fd_digits``.

Inception features mean little on 8 × 8 grey digits, and the real Inception weights need the network.
This classifier is trained once, offline, in a few seconds on a CPU, on the *training* split of
:class:`~diffusionflow.data.digits.Digits` (the images the diffusion models learn from; the test split
measures its accuracy), then cached as a state dict. Its penultimate layer (64-d) gives the features of
a Fréchet distance, reported as ``fd_digits`` — a Fréchet distance in this network's feature space, not
FID, and comparable only between runs that use the same classifier (same ``name``). Domain-specific
classifiers as FD feature spaces are common practice (e.g. the "Fréchet distance with a LeNet" of
MNIST papers; EDM2's ``fd_dinov2`` generalises FD to other networks, Karras et al. 2024).

Input: uint8 (N, 1, H, W), H ∈ {8, 16, 32}, the dataset's resolutions. Larger images are reduced to the
native 8 × 8 by area averaging (``interpolate(mode="area")``: the mean of each 2 × 2 or 4 × 4 block),
which inverts nearest-neighbour upscaling exactly and bilinear upscaling up to a blur.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, interpolate, pad

from diffusionflow.data.digits import Digits
from diffusionflow.metrics.cache import read_cached, write_cached
from diffusionflow.metrics.extractors import FeatureExtractor, to_uint8
from diffusionflow.paths import root_dir

__all__ = ["CACHE_ENV", "DigitsClassifier", "default_cache_dir"]

log = logging.getLogger(__name__)

CACHE_ENV = "DIFFUSIONFLOW_CACHE"
VERSION = 1
RESOLUTION = 8
INPUT_RESOLUTIONS = (8, 16, 32)
EPOCHS = 30
BATCH = 64
LR = 2e-3


def default_cache_dir() -> Path:
    """``$DIFFUSIONFLOW_CACHE`` if set, else ``<root>/.cache/diffusionflow`` with the root of
    :func:`diffusionflow.paths.root_dir` (the configs' ``${paths.root_dir}/.cache/diffusionflow``)."""
    return Path(os.environ.get(CACHE_ENV) or root_dir() / ".cache" / "diffusionflow")


class _CNN(nn.Module):
    """conv32-pool-conv64-pool-fc64-fc10 on 8 × 8 inputs in [-1, 1]; SiLU keeps every feature unit
    alive (ReLU units that never fire would make the feature covariance singular)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def _preprocess(images: Tensor) -> Tensor:
    """uint8 (N, 1, H, W), H ∈ {8, 16, 32} → float32 (N, 1, 8, 8) in [-1, 1] (area-averaged)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"the digits classifier takes uint8 (N, 1, H, W) images, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[-1] not in INPUT_RESOLUTIONS or images.shape[-2] != images.shape[-1]:
        raise ValueError(
            f"the digits classifier takes square images of side {list(INPUT_RESOLUTIONS)}, "
            f"got {tuple(images.shape[-2:])}"
        )
    x = images.to(torch.float32) / 127.5 - 1.0
    return interpolate(x, size=RESOLUTION, mode="area") if x.shape[-1] != RESOLUTION else x


def _split(split: str) -> tuple[Tensor, Tensor]:
    """The digits split as the classifier sees it: quantised to uint8 like generated images."""
    data = Digits(split=split, resolution=RESOLUTION)
    return _preprocess(to_uint8(data.x)), data.y


@torch.no_grad()
def _accuracy(net: _CNN, x: Tensor, y: Tensor) -> float:
    return float((net(x).argmax(1) == y).double().mean())


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block (the cached small nets train this way: they gain nothing
    from more, and on a busy machine two threads were ten times slower, 5 s vs 50 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(seed: int, feature_dim: int) -> tuple[dict[str, Tensor], float]:
    """Adam on cross-entropy, ``EPOCHS`` epochs of the training split, with random ±1-pixel shifts;
    everything drawn from ``seed`` (the global RNG is left untouched). Returns the state dict and the
    test-split accuracy."""
    x, y = _split("train")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _CNN(feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * -(-len(y) // BATCH))
    padded = pad(x, (1, 1, 1, 1), value=-1.0)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
            batch = padded[idx, :, dy : dy + RESOLUTION, dx : dx + RESOLUTION]
            loss = cross_entropy(net(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net.state_dict(), _accuracy(net, *_split("test"))


class DigitsClassifier(FeatureExtractor):
    """The digits CNN as a feature extractor: uint8 (N, 1, H, W) → (N, 64) penultimate features.

    Trained on first use and cached in ``cache_dir`` (default :func:`default_cache_dir`) as
    ``<name>.pt`` with its SHA-256 in ``<name>.pt.sha256``; later constructions load it with
    ``weights_only=True`` (the log says hit or miss). A truncated, corrupted or foreign file is retrained,
    with a warning, and replaced atomically. ``test_accuracy`` is its accuracy on the digits test split
    (≈ 0.98). Not thread- or process-safe on a cache miss: under DDP, build it on rank 0 first
    (``FIDCallback`` does), the file is written atomically.
    """

    metric_name = "fd_digits"
    feature_dim = 64

    def __init__(self, cache_dir: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        self.name = f"digits-classifier-v{VERSION}-seed{seed}-r{RESOLUTION}"
        self.net = _CNN(self.feature_dim)
        path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{self.name}.pt"
        saved = self._load(path)
        if saved is not None:
            log.info("digits classifier: cache hit %s", path)
        else:
            start = time.perf_counter()
            with one_cpu_thread():
                state, accuracy = _fit(seed, self.feature_dim)
            saved = {"state_dict": state, "test_accuracy": accuracy, "name": self.name}
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            write_cached(path, buffer.getvalue())
            self.net.load_state_dict(saved["state_dict"])
            log.info(
                "digits classifier: cache miss, trained in %.1f s (test accuracy %.4f), saved to %s",
                time.perf_counter() - start,
                accuracy,
                path,
            )
        self.test_accuracy = float(saved["test_accuracy"])
        self.path = path
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> dict[str, Any] | None:
        """The cached classifier, loaded into ``self.net``, if ``path`` matches its checksum and holds
        this classifier; else None (with a warning, unless the file is missing): it is retrained."""
        data = read_cached(path, log, "digits classifier cache")
        if data is None:
            return None
        try:
            saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("name") != self.name:
                raise ValueError(f"it holds no {self.name} classifier")
            self.net.load_state_dict(saved["state_dict"])
            float(saved["test_accuracy"])
        except Exception as err:
            log.warning("digits classifier cache %s is unusable (%s): rebuilding it", path, err)
            return None
        return saved

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """(N, 10) class logits of uint8 images."""
        return self.net(_preprocess(images.to(self.device)))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.trunk(_preprocess(images.to(self.device)))
