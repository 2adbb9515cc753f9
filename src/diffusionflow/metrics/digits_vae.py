"""The digits autoencoder and the digits' latents: the ImageNet-256 latent pipeline in miniature, offline.

Latent diffusion (Rombach et al. 2022; DiT, SiT, EDM2 on ImageNet-256) trains on the latents of a frozen
VAE and decodes its samples before FID. Here the same path runs on a CPU in minutes: a tiny diffusers
``AutoencoderKL`` (the ``"digits"`` architecture of :data:`diffusionflow.nn.vae.VAE_CONFIGS`: 1×16×16 →
4×4×4) is trained once on the training split of the 16 × 16 embedded digits
(:class:`~diffusionflow.data.digits.Digits`, the split the diffusion models learn from), seeded and
deterministic, and cached as a flat state dict that :func:`~diffusionflow.nn.vae.load_autoencoder` reads;
:func:`digits_latents` encodes a split into a latent folder of the format ``python -m diffusionflow.encode``
writes, read by :class:`~diffusionflow.data.latents.LatentDataset` (``experiment=digits_latent``).

Training: Adam (lr ``LR``, cosine decay) for ``EPOCHS`` epochs of batches of ``BATCH`` on the per-pixel
``mean ‖D(z) − x‖² + KL_WEIGHT · KL(q(z|x) ‖ N(0, I)) / 256``, z drawn from the posterior q(z|x) by the
reparameterisation (Kingma & Welling 2014), every draw from ``seed``; one CPU thread. A weak KL term, as in
LDM's "KL-reg" autoencoders (Rombach et al. 2022, §3; theirs weighs 10⁻⁶ against a summed reconstruction
loss): it keeps the latents bounded without blurring the reconstructions (10⁻⁴ gives the same test error);
the latent scale is normalised per channel afterwards (``edm2``). It trains in 57-64 s on a busy 2-core
machine where the digits classifier trains in 16 s: about 4 times the classifier's time. Test-split
reconstruction: MSE 0.0112, PSNR 25.5 dB (``tests/test_digits_latent.py`` bounds it at 24 dB).

The cache (``<cache>/digits-vae-seed<seed>.pt`` by default, beside the digits classifier, with its SHA-256
in ``.pt.sha256`` and a report ``.json``: version, seed, epochs, the weights' SHA-256 and the test-split
reconstruction error) is verified on every read (:mod:`diffusionflow.metrics.cache`); a missing, truncated,
corrupted or foreign file is retrained, with a warning, and replaced atomically. The reconstruction error is
measured on the test split with the posterior mean (the codec's deterministic encoding), decoded and
clamped to [−1, 1]: MSE in that range, PSNR = 10 log₁₀(2² / MSE) (peak-to-peak 2).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from diffusionflow.data.digits import Digits
from diffusionflow.data.latents import LABELS, LATENTS, META, LatentDataset
from diffusionflow.errors import ConfigError
from diffusionflow.metrics.cache import read_cached, write_cached
from diffusionflow.metrics.digits_classifier import default_cache_dir, one_cpu_thread
from diffusionflow.nn.vae import VAE_CONFIGS, build_autoencoder, latent_shape, latent_stats, load_autoencoder

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "CONFIG",
    "DigitsVAE",
    "default_weights_path",
    "digits_latents",
    "digits_vae",
    "reconstruction_error",
]

log = logging.getLogger(__name__)

CONFIG = "digits"
VERSION = 1
RESOLUTION = 16
EPOCHS = 10
BATCH = 32
LR = 2e-3
KL_WEIGHT = 1e-3


@dataclass(frozen=True)
class DigitsVAE:
    """A trained digits autoencoder: its weights file (``load_autoencoder("digits", weights_path)``),
    the file's SHA-256 and its reconstruction error on the digits test split."""

    weights_path: Path
    sha256: str
    seed: int
    epochs: int
    test_mse: float
    test_psnr: float
    train_seconds: float

    def autoencoder(self) -> AutoencoderKL:
        """The autoencoder, in eval mode with ``requires_grad`` off."""
        return load_autoencoder(CONFIG, self.weights_path)


REPORT_KEYS = [f.name for f in fields(DigitsVAE) if f.name != "weights_path"]


def default_weights_path(seed: int = 0) -> Path:
    """``<cache>/digits-vae-seed<seed>.pt``, the cache of the digits classifier
    (:func:`~diffusionflow.metrics.digits_classifier.default_cache_dir`)."""
    return default_cache_dir() / f"digits-vae-seed{seed}.pt"


def _images(split: str, **options: Any) -> Digits:
    return Digits(split=split, resolution=RESOLUTION, **options)


@torch.no_grad()
def reconstruction_error(autoencoder: AutoencoderKL, images: Tensor) -> tuple[float, float]:
    """(MSE, PSNR in dB) of ``images`` in [−1, 1] against their reconstructions D(m(x)) clamped to [−1, 1]."""
    reconstructed = autoencoder.decode(autoencoder.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = float((reconstructed - images).double().square().mean())
    return mse, 10 * math.log10(4 / mse)


def _fit(seed: int, epochs: int) -> dict[str, Tensor]:
    """The training of the module docstring; the global RNG is left untouched."""
    x = _images("train").x
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_autoencoder(CONFIG)
    opt = torch.optim.Adam(vae.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * -(-len(x) // BATCH)))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            posterior = vae.encode(x[idx]).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            kl = posterior.kl().mean() / x[0].numel()
            loss = (vae.decode(z).sample - x[idx]).square().mean() + KL_WEIGHT * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return vae.state_dict()


def _report_path(weights_path: Path) -> Path:
    return weights_path.with_suffix(".json")


def _load(path: Path, seed: int, epochs: int) -> DigitsVAE | None:
    """The cached autoencoder at ``path`` if it and its report match their checksums, this version, seed
    and epochs, and the weights load; else None (with a warning unless the files are missing)."""
    weights, report = read_cached(path, log, "digits VAE cache"), read_cached(_report_path(path), log)
    if weights is None or report is None:
        return None
    try:
        meta = json.loads(report)
        wanted = {
            "version": VERSION,
            "seed": seed,
            "epochs": epochs,
            "sha256": hashlib.sha256(weights).hexdigest(),
        }
        found = {k: meta.get(k) for k in wanted}
        if found != wanted:
            raise ValueError(f"its report says {found}, expected {wanted}")
        vae = DigitsVAE(**{k: meta[k] for k in REPORT_KEYS}, weights_path=path)
        vae.autoencoder()
    except Exception as err:
        log.warning("digits VAE cache %s is unusable (%s): rebuilding it", path, err)
        return None
    return vae


def digits_vae(weights_path: str | Path | None = None, seed: int = 0, epochs: int = EPOCHS) -> DigitsVAE:
    """The digits autoencoder of ``seed`` at ``weights_path`` (default :func:`default_weights_path`),
    trained there first if the cache misses (see the module docstring). Not process-safe on a miss: under
    DDP, call it on rank 0 first."""
    path = Path(weights_path) if weights_path is not None else default_weights_path(seed)
    cached = _load(path, seed, epochs)
    if cached is not None:
        log.info("digits VAE: cache hit %s (test PSNR %.2f dB)", path, cached.test_psnr)
        return cached
    start = time.perf_counter()
    with one_cpu_thread():
        state = _fit(seed, epochs)
    seconds = time.perf_counter() - start
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cached(path, data)
    autoencoder = load_autoencoder(CONFIG, path)
    mse, psnr = reconstruction_error(autoencoder, _images("test").x)
    sha = hashlib.sha256(data).hexdigest()
    vae = DigitsVAE(path, sha, seed, epochs, mse, psnr, seconds)
    report = {k: v for k, v in asdict(vae).items() if k != "weights_path"}
    write_cached(_report_path(path), json.dumps({"version": VERSION, **report}, indent=2).encode())
    log.info(
        "digits VAE: cache miss, trained in %.1f s (test MSE %.4g, PSNR %.2f dB), saved to %s",
        seconds,
        mse,
        psnr,
        path,
    )
    return vae


def digits_latents(
    split: str = "train",
    weights_path: str | Path | None = None,
    expect_vae: str | None = CONFIG,
    normalisation: str | None = None,
    seed: int = 0,
    resolution: int = RESOLUTION,
    upscale: str = "bilinear",
    n_train: int = 1500,
    split_seed: int = 0,
    hflip: bool = False,
) -> LatentDataset:
    """The digits ``split`` (:class:`~diffusionflow.data.digits.Digits` with these options, 16 × 16)
    encoded by the digits autoencoder (:func:`digits_vae` of ``seed`` at ``weights_path``) into a cached
    latent folder beside the weights (``digits-latents-<split>-<key>/``: posterior means, labels and
    ``meta.json``, each with its SHA-256), returned as a :class:`~diffusionflow.data.latents.LatentDataset`
    (``normalisation`` None: ``edm2``). The ``edm2`` statistics are those of the *training* split's latents
    for either split, so that both are normalised alike.

    ``expect_vae`` is the experiment's ``data.vae.config``, the autoencoder that will decode the samples:
    anything but ``"digits"`` is a ConfigError, raised before any training or encoding; so are a
    resolution other than 16 and ``hflip`` (no latents of mirrored digits are made)."""
    if expect_vae is not None and expect_vae != CONFIG:
        raise ConfigError(
            f"data.vae.config={expect_vae!r}, but the digits latents are encoded by vae={CONFIG!r}: set "
            f"data.vae.config={CONFIG} (or train on latents of {expect_vae!r}: data=latents)"
        )
    if resolution != RESOLUTION or hflip:
        raise ConfigError(
            f"digits latents: resolution={resolution}, hflip={hflip}; allowed: resolution={RESOLUTION} (the "
            "digits VAE's), hflip=false"
        )
    vae = digits_vae(weights_path, seed)
    options = {"upscale": upscale, "n_train": n_train, "split_seed": split_seed}
    key = {"version": VERSION, "vae_weights_sha256": vae.sha256, "split": split, **options}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = vae.weights_path.parent / f"digits-latents-{split}-{digest}"
    source = f"sklearn digits ({json.dumps(key, sort_keys=True)})"
    if not _folder_ok(root, {"vae": CONFIG, "vae_weights_sha256": vae.sha256, "source": source}):
        _write_folder(root, vae, split, options, source)
    return LatentDataset(root, expect_vae=expect_vae, normalisation=normalisation)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _folder_ok(root: Path, meta_wanted: dict[str, Any]) -> bool:
    """``root`` holds a complete latent folder whose files match their checksums and whose meta.json
    has ``meta_wanted``."""
    files = [read_cached(root / name, log, "digits latents") for name in (LATENTS, LABELS, META)]
    if any(f is None for f in files):
        return False
    meta = json.loads(files[2])
    return meta.get("done") is True and all(meta.get(k) == v for k, v in meta_wanted.items())


def _write_folder(root: Path, vae: DigitsVAE, split: str, options: dict[str, Any], source: str) -> None:
    """Encodes the ``split`` (posterior means, float32) into the latent folder ``root``, meta.json last."""
    autoencoder = vae.autoencoder()
    with torch.no_grad():
        encode = {s: autoencoder.encode(_images(s, **options).x).latent_dist.mean for s in {"train", split}}
    latents = encode[split].numpy().astype(np.float32)
    train = encode["train"].double()
    data_mean, data_std = train.mean((0, 2, 3)).tolist(), train.std((0, 2, 3), correction=0).tolist()
    config = VAE_CONFIGS[CONFIG]
    mean, std = latent_stats("edm2", data_mean, data_std, config["scaling_factor"])
    images = _images(split, **options)
    meta = {
        "vae": CONFIG,
        "vae_weights_sha256": vae.sha256,
        "normalisation": "edm2",
        "mean": mean,
        "std": std,
        "data_mean": data_mean,
        "data_std": data_std,
        "scaling_factor": config["scaling_factor"],
        "image_resolution": RESOLUTION,
        "latent_shape": list(latent_shape(config, (1, RESOLUTION, RESOLUTION))),
        "flip_copies": False,
        "source": source,
        "count": len(latents),
        "num_classes": images.num_classes,
        "done": True,
    }
    root.mkdir(parents=True, exist_ok=True)
    write_cached(root / LATENTS, _npy_bytes(latents))
    write_cached(root / LABELS, _npy_bytes(images.y.numpy().astype(np.int64)))
    write_cached(root / META, json.dumps(meta, indent=2).encode())
    log.info("digits latents: %d latents of the %s split written to %s", len(latents), split, root)
