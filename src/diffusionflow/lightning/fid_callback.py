"""FID (or any Fréchet distance in a feature space) during training, identical on 1 or N GPUs.

The callback decides *when* to measure and logs; what is measured is the library ``diffusionflow.metrics``
(EDM's recipe, Karras et al. 2022, ``generate.py`` and ``fid.py``):

* **Per-sample seeds** (:mod:`diffusionflow.metrics.generate`): sample i ∈ [0, N) has seed
  ``seed_offset + i`` for its initial and fresh noise and, for a class-conditional model, label
  i mod num_classes. The *set* of images is the same whatever the batch size and the number of ranks
  (users.md B3: same seed on every rank = the same images N times).
* **Sharded, never padded.** Rank r generates the contiguous shard ``shard(N, r, world)``: every
  index exactly once, shard sizes differing by at most one.
* **All-reduced float64 sums.** Each rank accumulates Σf, Σffᵀ and n of its features
  (:func:`~diffusionflow.metrics.fid.generate_features`); one ``all_reduce`` per measured
  (weights, sampler) after the loop — ranks with fewer images loop fewer times, no collective inside
  the loop — then every rank computes the same distance and checks that n = N exactly.
* **Every rank computes, rank 0 writes.** No rank-0-only sampling through the DDP-wrapped model
  (Lightning#15860) and no rank-0-only metric sync (torchmetrics#2684): the module (or its EMA copy)
  is used unwrapped on every rank; only logging, the CSV and the picture happen on rank 0.

Keys say what was measured (users.md B1/B2): ``{metric}/{N}_{sampler}{NFE}_{ema|raw}``, e.g.
``fid/50k_heun35_ema`` or ``fd_digits/500_heun35_ema``, and each evaluation appends a row to
``<run dir>/eval/fid.csv`` with the seed range and the reference set's key.

**Latent data** (a DataModule with ``vae``, ``conf/data/latents.yaml``): samples are decoded by the run's
VAE (:func:`~diffusionflow.lightning.final_eval.latent_codec`, built in ``setup``) before the features and
the mosaic, as DiT and SiT decode before ADM's evaluator; a ``train``/``val`` reference is then the VAE's
reconstructions of the set (an ``.npz`` reference, e.g. ADM's ImageNet-256 batch, is of real images).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor, nn

from diffusionflow.core.samplers import Sampler
from diffusionflow.lightning.after_step import AfterStep
from diffusionflow.lightning.ema import averaged_model, raw_weights
from diffusionflow.lightning.final_eval import latent_codec
from diffusionflow.metrics.digits_classifier import default_cache_dir
from diffusionflow.metrics.extractors import FeatureExtractor
from diffusionflow.metrics.fid import (
    REFERENCE_SPLITS,
    EvalRow,
    append_rows,
    generate_features,
    metric_key,
    metric_name_of,
    reference_moments,
)
from diffusionflow.metrics.frechet import frechet_distance
from diffusionflow.metrics.generate import SamplerSpec, nfe_of, parse_samplers, shard
from diffusionflow.metrics.pictures import mosaic
from diffusionflow.nn.vae import LatentCodec

__all__ = ["FIDCallback"]

log = logging.getLogger(__name__)

MOSAIC_FILE = "samples_mosaic.png"
CSV_FILE = Path("eval") / "fid.csv"


# ---- the callback ------------------------------------------------------------------------------------
class FIDCallback(AfterStep):
    """Fréchet distance of generated vs. reference images, every ``every_n_steps`` optimizer steps,
    every ``every_n_epochs`` epochs and/or when training ends, on every rank (see the module docstring).

    Args:
        extractor: a :class:`~diffusionflow.metrics.extractors.FeatureExtractor` (uint8 NCHW → features),
            a zero-argument factory of one (a Hydra ``_partial_: true`` node: built in ``setup``, rank 0
            first, so a cache miss is filled once), or a Hydra config of one.
        num_samples: N, the number of generated images per measurement.
        samplers: sampler configs (``{name, steps, **options}``, ``(name, steps)`` or ``"name:steps"``);
            None: the run's own sampler (``conf/sampler``).
        every_n_steps, every_n_epochs, on_train_end: when to measure (None: never).
        use_ema: measure the EMA weights (the averaged copy of Lightning's ``WeightAveraging``); without
            an EMA callback the raw weights are measured, with a warning, and keyed ``raw``.
        also_raw: measure the raw (trained) weights too.
        reference: ``train`` or ``val``: the DataModule's set, through the cached ``reference_stats``;
            or a path to an ``.npz`` with ``mu`` and ``sigma`` (e.g. EDM's ``fid-refs``).
        batch_size: images per generation batch on each rank.
        seed_offset: sample i uses seed ``seed_offset + i``.
        cache_dir: reference statistics cache (default ``$DIFFUSIONFLOW_CACHE`` or
            ``<project>/.cache/diffusionflow``).
        mosaic_size: images in ``samples_mosaic.png`` (written once, at the first measurement).
        progress: a progress bar on rank 0 (when the trainer shows one).
        metric_name: the key prefix; default from the extractor (``fid`` for Inception only).

    Values go to every logger (rank 0) and to ``trainer.callback_metrics`` (every rank, so a
    ``ModelCheckpoint`` can monitor them), not through ``LightningModule.log``: a value logged on a step
    that is not a multiple of ``log_every_n_steps`` would never reach the loggers, and ``on_train_end``
    does not allow ``log``. ``generated_indices`` holds the indices this rank generated last.

    **EMA weights, whatever the order of the callbacks.** ``ema`` is measured on the averaged copy that
    the EMA callback maintains (``lightning.ema.averaged_model``): a module of its own, correct before and
    after Lightning's end-of-training copy of the averaged weights into the LightningModule, so it does
    not matter whether that copy ran before this callback's ``on_train_end``. A measurement due after a
    step waits for the next hook (the next batch's start, the epoch's or training's end), when the EMA
    callback's update of that step is done, whichever callback comes first. ``raw`` is the
    LightningModule; at ``on_train_end`` after the copy, ``lightning.ema.raw_weights`` puts back the raw
    weights that ``diffusionflow.lightning.ema.EMA`` kept for the measurement (Lightning's own
    ``WeightAveraging`` keeps none: use ``EMA`` with ``also_raw``).
    """

    def __init__(
        self,
        extractor: FeatureExtractor | Callable[[], FeatureExtractor] | Mapping[str, Any],
        num_samples: int = 10_000,
        samplers: Sequence[SamplerSpec] | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_train_end: bool = True,
        use_ema: bool = True,
        also_raw: bool = False,
        reference: str = "train",
        batch_size: int = 256,
        seed_offset: int = 0,
        cache_dir: str | Path | None = None,
        mosaic_size: int = 64,
        progress: bool = True,
        metric_name: str | None = None,
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"FIDCallback: num_samples={num_samples} must be >= 2 (a covariance needs 2)")
        for key, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"FIDCallback: {key}={value} must be >= 1 or null (never)")
        if batch_size < 1 or seed_offset < 0 or mosaic_size < 0:
            raise ValueError(
                f"FIDCallback: batch_size={batch_size} must be >= 1, seed_offset={seed_offset} and "
                f"mosaic_size={mosaic_size} >= 0"
            )
        if reference not in REFERENCE_SPLITS and not Path(reference).is_file():
            raise ValueError(
                f"FIDCallback: reference={reference!r} is neither one of {list(REFERENCE_SPLITS)} nor an "
                ".npz file with mu and sigma"
            )
        self.extractor_spec = extractor
        self.num_samples = num_samples
        self.samplers = None if samplers is None else parse_samplers(samplers)
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.at_train_end = on_train_end
        self.use_ema, self.also_raw = use_ema, also_raw
        self.reference, self.batch_size, self.seed_offset = reference, batch_size, seed_offset
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.mosaic_size, self.progress, self.metric_name = mosaic_size, progress, metric_name
        self.extractor: FeatureExtractor | None = None
        self.codec: LatentCodec | None = None
        self.decoder_key: str | None = None
        self.ema: WeightAveraging | None = None
        self.mosaic_logged = False
        self.generated_indices: list[int] = []
        self._measured: list[tuple[Sampler, int]] = []
        self._ref: tuple[np.ndarray, np.ndarray, str] | None = None
        self._last_step: int | None = None

    # -- setup --
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fast_dev_run:
            return
        if trainer.datamodule is None:
            raise ValueError("FIDCallback needs a DataModule (its shape and reference set), not bare loaders")
        shape = tuple(trainer.datamodule.shape)
        if len(shape) != 3:
            raise ValueError(
                f"FIDCallback needs image data (C, H, W), but data.shape={list(shape)}; 2-D data gets sliced "
                "W2 and energy distance from callbacks.final_eval"
            )
        self.extractor = self._build_extractor(trainer).to(pl_module.device)
        latent = latent_codec(trainer.datamodule)
        if latent is not None:
            self.codec, self.decoder_key = latent[0].to(trainer.strategy.root_device), latent[1]
        if self.num_samples < self.extractor.feature_dim:
            rank_zero_warn(
                f"FIDCallback: num_samples={self.num_samples} < {self.extractor.feature_dim}, the feature "
                f"dimension of {self.extractor.name}: the sample covariance is singular and the distance "
                "biased upward"
            )
        self.ema = next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)
        if self.use_ema and self.ema is None:
            rank_zero_warn(
                "FIDCallback: use_ema=true but there is no EMA callback: measuring the raw weights"
            )
        samplers = self.samplers or [pl_module.sampler]
        self._measured = [(s, nfe_of(s, pl_module.schedule)) for s in samplers]
        keys = [self._key(s, nfe, w) for w in self._weights() for s, nfe in self._measured]
        if len(set(keys)) != len(keys):
            raise ValueError(f"FIDCallback: samplers give duplicate keys {keys}; give them different steps")

    def _build_extractor(self, trainer: Trainer) -> FeatureExtractor:
        """The extractor; a factory or config is built on rank 0 first, then on the others (EDM's "rank 0
        goes first"), so that a cache miss (trained classifier) is filled by one process."""
        spec = self.extractor_spec
        if isinstance(spec, nn.Module):
            return spec
        build = spec if callable(spec) else lambda: instantiate(spec)
        if not trainer.is_global_zero:
            trainer.strategy.barrier("fid_extractor")
        extractor = build()
        if trainer.is_global_zero:
            trainer.strategy.barrier("fid_extractor")
        return extractor

    def _weights(self) -> list[str]:
        ema = self.use_ema and self.ema is not None
        return (["ema"] if ema else []) + (["raw"] if self.also_raw or not ema else [])

    def _metric(self) -> str:
        return self.metric_name or metric_name_of(self.extractor)

    def _key(self, sampler: Sampler, nfe: int, weights: str) -> str:
        return metric_key(self._metric(), self.num_samples, sampler.name, nfe, weights)

    # -- when (every_n_steps: lightning.after_step.AfterStep) --
    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.at_train_end:
            self.evaluate(trainer, pl_module)

    # -- what --
    @contextmanager
    def _model(self, weights: str, pl_module: LightningModule) -> Iterator[nn.Module]:
        """The unwrapped model of ``weights`` (never ``trainer.model``, the DDP wrapper)."""
        if weights == "ema":
            yield averaged_model(self.ema)
        else:
            with raw_weights(self.ema, pl_module) as raw:
                yield raw

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Measures every (weights, sampler) now, on every rank; logs on rank 0. Once per global step."""
        step = trainer.global_step
        if trainer.fast_dev_run or step == self._last_step:
            if trainer.fast_dev_run:
                rank_zero_info("FIDCallback: skipped under fast_dev_run")
            return {}
        self._last_step = step
        decode = None if self.codec is None else self.codec.decode
        if self._ref is None:
            self._ref = reference_moments(
                self.reference,
                trainer.datamodule,
                self.extractor,
                self.cache_dir,
                self.batch_size,
                decode=decode,
                decoder=self.decoder_key,
            )
        mu_ref, sigma_ref, ref_key = self._ref
        indices = shard(self.num_samples, trainer.global_rank, trainer.world_size)
        show = self.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None
        seeds = f"{self.seed_offset}-{self.seed_offset + self.num_samples - 1}"
        rows = []
        for weights in self._weights():
            with self._model(weights, pl_module) as model:
                for sampler, nfe in self._measured:
                    key = self._key(sampler, nfe, weights)
                    gen = generate_features(
                        model,
                        sampler,
                        indices,
                        self.extractor,
                        shape=trainer.datamodule.shape,
                        batch_size=self.batch_size,
                        seed_offset=self.seed_offset,
                        keep=0 if self.mosaic_logged else self.mosaic_size,
                        progress=show,
                        desc=key,
                        decode=decode,
                    )
                    gen.stats.all_reduce()
                    if gen.stats.count != self.num_samples:
                        raise RuntimeError(
                            f"{key}: the ranks generated {gen.stats.count} images in all, "
                            f"not {self.num_samples}"
                        )
                    value = frechet_distance(*gen.stats.mean_cov(), mu_ref, sigma_ref)
                    rows.append(
                        EvalRow(
                            key=key,
                            metric=self._metric(),
                            value=value,
                            num_samples=gen.stats.count,
                            sampler=sampler.name,
                            steps=sampler.steps,
                            nfe=nfe,
                            seeds=seeds,
                            weights=weights,
                            reference=ref_key,
                            sampler_config=repr(sampler),
                        )
                    )
                    self.generated_indices = gen.indices
                    if not self.mosaic_logged:
                        self.mosaic_logged = True
                        if trainer.is_global_zero and len(gen.images):
                            self._log_mosaic(trainer, gen.images)
        metrics = {row.key: row.value for row in rows}
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
                lg.save()
            append_rows(Path(trainer.default_root_dir) / CSV_FILE, rows, step=step)
            log.info("step %d: %s", step, ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items()))
        return metrics

    def _log_mosaic(self, trainer: Trainer, images: Tensor) -> None:
        picture = mosaic(images)
        path = Path(trainer.default_root_dir) / MOSAIC_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(
                    key="samples_mosaic", images=[picture.permute(1, 2, 0).numpy()], step=trainer.global_step
                )
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image("samples_mosaic", picture, global_step=trainer.global_step)

    # -- resume --
    @property
    def state_key(self) -> str:
        """Unique per extractor and N, so that several FID callbacks (``fid`` and ``fd_digits``) can be
        checkpointed side by side."""
        spec = self.extractor_spec
        target = spec.get("_target_") if isinstance(spec, Mapping) else getattr(spec, "func", type(spec))
        name = target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"
        return self._generate_state_key(extractor=name, num_samples=self.num_samples)

    def state_dict(self) -> dict[str, Any]:
        return {"mosaic_logged": self.mosaic_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # "grid_logged": the key of checkpoints written before the rename
        self.mosaic_logged = bool(state_dict.get("mosaic_logged", state_dict.get("grid_logged", False)))
