"""End-of-run evaluation that needs no network: samples, a picture, and data-space metrics.

For 2-D toy data: sliced Wasserstein-2 and energy distance between generated and fresh reference
samples (exact samples for the Gaussian mixtures), the same two numbers between two reference sets
(the noise floor at this sample size, ``*_floor``), and, for mixtures, the mean exact log-density
of the generated samples beside that of exact samples. Images get a sample mosaic. Samples come from
per-sample seeds (``metrics.generate``): sample i from seed ``seed + i``, label i mod num_classes.
Latent data (a DataModule with a ``vae``, ``conf/data/latents.yaml``) are decoded by :func:`latent_codec`
first: ``samples.npz`` holds the images (``samples``) and the latents (``latents``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from diffusionflow.data.transforms import file_sha256
from diffusionflow.lightning.after_step import AfterStep
from diffusionflow.lightning.ema import averaged_model
from diffusionflow.metrics.fid import decode_latents
from diffusionflow.metrics.generate import GenerativeModel, default_labels, generate
from diffusionflow.metrics.pictures import image_mosaic, scatter_plot
from diffusionflow.metrics.toy_samples import toy_metrics
from diffusionflow.nn.vae import LatentCodec, load_autoencoder, resolve_weights

__all__ = ["FinalEvaluation", "final_evaluation", "generate_fixed", "latent_codec"]


def latent_codec(datamodule: Any) -> tuple[LatentCodec, str] | None:
    """For latent data (a DataModule whose ``vae`` is set: ``data.vae``), the codec that decodes its
    samples, the autoencoder of ``data.vae.config`` with the weights of ``data.vae.weights_path``
    (:func:`~diffusionflow.nn.vae.load_autoencoder`: a missing file fails here, naming it) and the
    normalisation of the set-up training set (a ``LatentDataset``), with a key naming it (config, the
    weights' SHA-256, normalisation); None for pixel data."""
    vae = getattr(datamodule, "vae", None)
    if not vae:
        return None
    dataset = datamodule.train_set
    path = resolve_weights(vae["config"], vae.get("weights_path"))
    codec = LatentCodec.from_meta(load_autoencoder(vae["config"], path), dataset.meta, dataset.normalisation)
    return codec, f"{vae['config']}:{file_sha256(path)[:16]}:{dataset.normalisation}"


def generate_fixed(
    module: GenerativeModel, dataset: Any, num_samples: int, seed: int
) -> tuple[Tensor, Tensor | None]:
    """``num_samples`` samples (CPU) and their labels, with the module's sampler and current weights:
    sample i from seed ``seed + i`` with label i mod num_classes
    (:func:`~diffusionflow.metrics.generate.generate`, in one batch; the module's mode is restored)."""
    indices = range(num_samples)
    samples = generate(module, indices, shape=dataset.shape, batch_size=num_samples, seed_offset=seed)
    return samples, default_labels(indices, module.num_classes)


def final_evaluation(
    module: GenerativeModel,
    dataset: Any,
    out_dir: Path,
    num_samples: int = 4096,
    seed: int = 0,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Generates ``num_samples`` from seeds ``seed``, …, ``seed + num_samples − 1`` with the module's
    sampler (its current weights: EMA after training), writes ``samples.npz`` and ``samples.png``, and
    returns metrics (keys ``final/...``). Latent samples are decoded by ``decode`` (latents → images in
    [−1, 1]) before the picture; ``samples.npz`` then also holds them as ``latents``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, labels = generate_fixed(module, dataset, num_samples, seed)
    latents: dict[str, np.ndarray] = {}
    if decode is not None:
        latents = {"latents": samples.numpy()}
        samples = decode_latents(decode, samples, module.device).cpu()
    np.savez(
        out_dir / "samples.npz",
        samples=samples.numpy(),
        labels=None if labels is None else labels.cpu().numpy(),
        **latents,
    )
    metrics: dict[str, float] = {"nfe": float(module.sampler.nfe)}
    if len(dataset.shape) == 1:
        metrics.update(toy_metrics(samples, dataset, num_samples, seed))
        scatter_plot(samples, dataset, out_dir / "samples.png")
    else:
        image_mosaic(samples[:100].clamp(-1, 1), out_dir / "samples.png")
    metrics = {f"final/{k}": v for k, v in metrics.items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


class FinalEvaluation(AfterStep):
    """Runs ``final_evaluation`` on rank 0 when fit ends (after the EMA weights were copied in), logs
    its metrics to every logger and leaves them in ``trainer.callback_metrics``.

    With ``every_n_steps``, 2-D data are also measured during training, on rank 0, with the EMA
    weights (the averaged copy, ``lightning.ema.averaged_model``) and the same seeds:
    ``toy/{sliced_w2,energy_distance,log_density}`` at each multiple of ``every_n_steps``, to the loggers
    only (the curves of ``diffusionflow.compare``'s ``metric_vs_step.png``). A measurement due after a
    step is made at the next hook (the next batch's start, the epoch's or training's end), so that the
    EMA update of that step is in whatever the order of the callbacks; it is logged at that step. At the
    last step they equal the ``final/`` values. No collective is involved, so the other ranks do not
    wait."""

    def __init__(self, num_samples: int = 4096, seed: int = 0, every_n_steps: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"callbacks.final_eval.num_samples={num_samples} must be >= 1")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.final_eval.every_n_steps={every_n_steps} must be >= 1 or null")
        self.num_samples, self.seed, self.every_n_steps = num_samples, seed, every_n_steps
        self.ema: WeightAveraging | None = None
        self.codec: LatentCodec | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.ema = next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)
        if stage == "fit" and trainer.datamodule is not None:  # latent data: the decoder, before training
            latent = latent_codec(trainer.datamodule)
            self.codec = None if latent is None else latent[0].to(trainer.strategy.root_device)

    def wants(self, trainer: Trainer) -> bool:
        return trainer.is_global_zero

    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """The toy metrics of ``step`` (rank 0, 2-D data)."""
        dataset = trainer.datamodule.train_set
        if len(dataset.shape) != 1:
            return
        model = pl_module if self.ema is None else averaged_model(self.ema)
        samples, _ = generate_fixed(model, dataset, self.num_samples, self.seed)
        metrics = toy_metrics(samples, dataset, self.num_samples, self.seed)
        logged = {f"toy/{k}": v for k, v in metrics.items() if not k.endswith(("_floor", "_data"))}
        for lg in trainer.loggers:
            lg.log_metrics(logged, step=step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        out_dir = Path(trainer.default_root_dir)
        metrics = final_evaluation(
            pl_module,
            trainer.datamodule.train_set,
            out_dir,
            self.num_samples,
            self.seed,
            decode=None if self.codec is None else self.codec.decode,
        )
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
