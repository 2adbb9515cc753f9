"""FID (or any Fréchet distance in a feature space) during training, identical on 1 or N GPUs.

EDM's recipe (Karras et al. 2022, ``generate.py`` and ``fid.py``), adapted to Lightning:

* **Per-sample seeds.** Sample i ∈ [0, N) draws its initial noise, and any fresh noise of a stochastic
  sampler, from its own ``torch.Generator().manual_seed(seed_offset + i)``; a class-conditional model
  gets label i mod num_classes. The *set* of images is therefore the same whatever the batch size and
  the number of ranks (users.md B3: same seed on every rank = the same images N times).
* **Sharded, never padded.** Rank r generates the contiguous shard ``shard(N, r, world)``: every
  index exactly once, shard sizes differing by at most one.
* **All-reduced float64 sums.** Each rank accumulates Σf, Σffᵀ and n of its features
  (:class:`~diffusionflow.metrics.frechet.FrechetStats`); one ``all_reduce`` per measured
  (weights, sampler) after the loop — ranks with fewer images loop fewer times, no collective inside
  the loop — then every rank computes the same distance and checks that n = N exactly.
* **Every rank computes, rank 0 writes.** No rank-0-only sampling through the DDP-wrapped model
  (Lightning#15860) and no rank-0-only metric sync (torchmetrics#2684): the module (or its EMA copy)
  is used unwrapped on every rank; only logging, the CSV and the picture happen on rank 0.

Keys say what was measured (users.md B1/B2): ``{metric}/{N}_{sampler}{NFE}_{ema|raw}``, e.g.
``fid/50k_heun35_ema`` or ``fd_digits/500_heun35_ema``, and each evaluation appends a row to
``<run dir>/eval/fid.csv`` with the seed range and the reference set's key.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusionflow.core import samplers as core_samplers
from diffusionflow.core.samplers import Sampler, seeded_noise
from diffusionflow.core.schedules import Schedule
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.metrics.digits_classifier import default_cache_dir
from diffusionflow.metrics.extractors import FeatureExtractor, to_uint8
from diffusionflow.metrics.frechet import FrechetStats, frechet_distance
from diffusionflow.metrics.reference import reference_stats

__all__ = [
    "EvalRow",
    "FIDCallback",
    "Generated",
    "append_rows",
    "describe_dataset",
    "format_count",
    "generate_batches",
    "generate_features",
    "metric_key",
    "metric_name_of",
    "nfe_of",
    "parse_samplers",
    "reference_moments",
    "shard",
]

log = logging.getLogger(__name__)

SamplerSpec = str | Mapping[str, Any] | Sequence[Any]
REFERENCE_SPLITS = ("train", "val")
GRID_FILE = "samples_grid.png"
CSV_FILE = Path("eval") / "fid.csv"


# ---- what is measured, and how it is named ---------------------------------------------------------
def format_count(n: int) -> str:
    """500 → ``500``, 10000 → ``10k``, 50000 → ``50k`` (thousands only when exact)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_key(metric: str, num_samples: int, sampler: str, nfe: int, weights: str) -> str:
    """``{metric}/{N}_{sampler}{NFE}_{weights}``, e.g. ``fid/10k_heun35_ema``."""
    return f"{metric}/{format_count(num_samples)}_{sampler}{nfe}_{weights}"


def metric_name_of(extractor: nn.Module) -> str:
    """The extractor's ``metric_name`` (``fd_digits``), else ``fid`` for Inception, else ``fd_<name>``:
    only Inception features give "FID"."""
    name = getattr(extractor, "metric_name", None)
    if name:
        return str(name)
    return "fid" if extractor.name.startswith("inception") else f"fd_{extractor.name}"


def parse_samplers(specs: Sequence[SamplerSpec]) -> list[Sampler]:
    """Samplers from ``"name:steps"`` strings, ``(name, steps)`` pairs or ``{name, steps, **options}``
    dicts (options as in ``conf/sampler``), built with :func:`diffusionflow.core.samplers.build`."""
    if isinstance(specs, DictConfig | ListConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    if isinstance(specs, str | Mapping) or not specs:
        raise ValueError(f"samplers={specs!r}: expected a non-empty list of samplers")
    out = []
    for spec in specs:
        if isinstance(spec, str):
            name, _, steps = spec.partition(":")
            if not steps.isdigit():
                raise ValueError(f"sampler {spec!r}: expected name:steps, e.g. heun:18")
            kwargs: dict[str, Any] = {"name": name, "steps": int(steps)}
        elif isinstance(spec, Mapping):
            kwargs = dict(spec)
        elif isinstance(spec, Sequence) and len(spec) == 2:
            kwargs = {"name": spec[0], "steps": spec[1]}
        else:
            raise ValueError(f"sampler {spec!r}: expected 'name:steps', (name, steps) or a dict")
        if "name" not in kwargs or "steps" not in kwargs:
            raise ValueError(f"sampler {spec!r}: needs a name and steps")
        out.append(core_samplers.build(kwargs.pop("name"), **kwargs))
    return out


def nfe_of(sampler: Sampler, schedule: Schedule) -> int:
    """The number of denoiser calls of ``sampler`` on ``schedule`` (a dry run on one scalar with a zero
    denoiser: NFE does not depend on the data, and ranks without images still know it)."""
    sampler(
        lambda z, t: torch.zeros_like(z),
        torch.zeros(1, 1, dtype=torch.float64),
        schedule,
        generator=torch.Generator().manual_seed(0),
    )
    return sampler.nfe


def shard(n: int, rank: int, world_size: int) -> range:
    """Rank r's indices [⌊rN/W⌋, ⌊(r+1)N/W⌋): the shards cover 0..N−1 exactly once and differ in size by
    at most one (torch.tensor_split's rule); a rank may get none when N < W."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


# ---- generation from per-sample seeds ----------------------------------------------------------------
def generate_batches(
    module: DiffusionModule,
    sampler: Sampler,
    indices: Sequence[int],
    shape: Sequence[int],
    batch_size: int,
    seed_offset: int = 0,
) -> Iterator[tuple[list[int], Tensor]]:
    """Yields ``(indices, samples)`` per batch. Sample i's initial noise and the sampler's fresh noise come
    from its own ``torch.Generator().manual_seed(seed_offset + i)`` (EDM's ``generate.py --seeds``), its
    label is i mod ``module.num_classes`` for a class-conditional model: a sample does not depend on
    which batch or rank generated it."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        noise, gens = seeded_noise([seed_offset + i for i in idx], shape, module.dtype)
        labels = torch.tensor(idx, device=module.device) % module.num_classes if module.num_classes else None
        yield idx, module.generate(noise.to(module.device), labels, sampler, generator=gens)


@dataclass
class Generated:
    """What :func:`generate_features` returns: this rank's (not yet all-reduced) statistics, the indices
    it generated, and the first ``keep`` images as uint8 (for a grid)."""

    stats: FrechetStats
    indices: list[int]
    images: Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_features(
    module: DiffusionModule,
    sampler: Sampler,
    indices: Sequence[int],
    extractor: FeatureExtractor,
    *,
    shape: Sequence[int],
    batch_size: int,
    seed_offset: int = 0,
    keep: int = 0,
    progress: bool = False,
    desc: str = "",
) -> Generated:
    """Generates ``indices`` (:func:`generate_batches`), rounds them to uint8 as a saved PNG would be
    (:func:`~diffusionflow.metrics.extractors.to_uint8`) and accumulates the extractor's features in float64
    sums. ``progress`` shows a bar with the generation and feature-extraction throughput."""
    stats = FrechetStats(extractor.feature_dim, device=module.device)
    done: list[int] = []
    kept: list[Tensor] = []
    seconds = {"gen": 0.0, "feat": 0.0}
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        tick = time.perf_counter()
        for idx, samples in generate_batches(module, sampler, indices, shape, batch_size, seed_offset):
            images = to_uint8(samples)
            _sync(images.device)
            generated = time.perf_counter()
            stats.update(extractor(images))
            _sync(images.device)
            seconds["gen"] += generated - tick
            tick = time.perf_counter()
            seconds["feat"] += tick - generated
            done += idx
            if sum(len(k) for k in kept) < keep:
                kept.append(images[: keep - sum(len(k) for k in kept)].cpu())
            bar.update(len(idx))
            bar.set_postfix({k: f"{len(done) / max(v, 1e-9):.0f} img/s" for k, v in seconds.items()})
    empty = torch.zeros(0, *shape, dtype=torch.uint8)
    return Generated(stats, done, torch.cat(kept) if kept else empty)


# ---- the reference set -------------------------------------------------------------------------------
@contextmanager
def _no_flips(dataset: Any) -> Iterator[None]:
    """Reference images as stored: random flips (train-time augmentation) off meanwhile."""
    hflip = getattr(dataset, "hflip", False)
    dataset.hflip = False
    try:
        yield
    finally:
        dataset.hflip = hflip


def _dataset_batches(dataset: Any, batch_size: int, rank: int, world: int) -> Iterator[Tensor]:
    """uint8 batches of this rank's shard of ``dataset`` (items ``(x in [-1, 1], y)``)."""
    with _no_flips(dataset):
        idx = shard(len(dataset), rank, world)
        for start in range(idx.start, idx.stop, batch_size):
            items = range(start, min(start + batch_size, idx.stop))
            yield to_uint8(torch.stack([dataset[i][0] for i in items]))


def describe_dataset(factory: Callable[[], Any], dataset: Any) -> str:
    """The dataset's class (or factory) with the options that change its images, not ``root``,
    ``download``, ``hflip``, ``split`` or ``resolution``: e.g. ``Digits(n_train=1500,split_seed=0,...)``."""
    func = getattr(factory, "func", factory)
    skip = ("root", "download", "hflip", "split", "resolution")
    options = {k: v for k, v in sorted(getattr(factory, "keywords", {}).items()) if k not in skip}
    name = getattr(func, "__name__", type(dataset).__name__)
    return f"{name}({','.join(f'{k}={v}' for k, v in options.items())})" if options else name


def reference_moments(
    reference: str,
    datamodule: Any,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(μ, Σ, key as JSON) of the reference set. ``train`` or ``val``: all of the (set-up) DataModule's
    set, through the cached, rank-sharded :func:`~diffusionflow.metrics.reference.reference_stats` (call
    it on every rank), keyed by dataset, split, resolution, extractor and count. Else ``reference`` is an
    ``.npz`` with ``mu`` and ``sigma`` (EDM's ``fid.py ref`` format)."""
    if reference not in REFERENCE_SPLITS:
        with np.load(reference) as npz:
            mu, sigma = npz["mu"], npz["sigma"]
        if mu.shape != (extractor.feature_dim,):
            raise ValueError(
                f"reference={reference}: mu has shape {mu.shape}, but {extractor.name} gives "
                f"{extractor.feature_dim} features"
            )
        return mu, sigma, json.dumps({"file": str(reference)})
    train = reference == "train"
    factory = datamodule.train_factory if train else datamodule.val_factory
    dataset = datamodule.train_set if train else datamodule.val_set
    if dataset is None:
        raise ValueError("reference=val, but the DataModule has no val_dataset")
    key: dict[str, str | int] = {
        "dataset": describe_dataset(factory, dataset),
        "split": reference,
        "resolution": int(dataset[0][0].shape[-1]),
        "extractor": extractor.name,
        "count": len(dataset),
    }
    stats = reference_stats(
        lambda rank, world: _dataset_batches(dataset, batch_size, rank, world), extractor, key, cache_dir
    )
    return *stats.mean_cov(), json.dumps(key, sort_keys=True)


# ---- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRow:
    """One measured number, with everything needed to reproduce it."""

    key: str
    metric: str
    value: float
    num_samples: int
    sampler: str
    steps: int
    nfe: int
    seeds: str
    weights: str
    reference: str
    sampler_config: str


def append_rows(path: Path, rows: Sequence[EvalRow], **extra: Any) -> None:
    """Appends ``rows`` (with ``extra`` columns first) to a CSV, writing the header to a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*extra, *EvalRow.__dataclass_fields__])
        if new:
            writer.writeheader()
        writer.writerows({**extra, **asdict(row)} for row in rows)


def _grid(images: Tensor) -> Tensor:
    """uint8 (3, H, W): the images in a square grid."""
    from torchvision.utils import make_grid

    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=1)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


# ---- the callback ------------------------------------------------------------------------------------
class FIDCallback(Callback):
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
        grid_size: images in ``samples_grid.png`` (written once, at the first measurement).
        progress: a progress bar on rank 0 (when the trainer shows one).
        metric_name: the key prefix; default from the extractor (``fid`` for Inception only).

    Values go to every logger (rank 0) and to ``trainer.callback_metrics`` (every rank, so a
    ``ModelCheckpoint`` can monitor them), not through ``LightningModule.log``: a value logged on a step
    that is not a multiple of ``log_every_n_steps`` would never reach the loggers, and ``on_train_end``
    does not allow ``log``. ``generated_indices`` holds the indices this rank generated last.
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
        grid_size: int = 64,
        progress: bool = True,
        metric_name: str | None = None,
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"FIDCallback: num_samples={num_samples} must be >= 2 (a covariance needs 2)")
        for key, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"FIDCallback: {key}={value} must be >= 1 or null (never)")
        if batch_size < 1 or seed_offset < 0 or grid_size < 0:
            raise ValueError(
                f"FIDCallback: batch_size={batch_size} must be >= 1, seed_offset={seed_offset} and "
                f"grid_size={grid_size} >= 0"
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
        self.grid_size, self.progress, self.metric_name = grid_size, progress, metric_name
        self.extractor: FeatureExtractor | None = None
        self.ema: WeightAveraging | None = None
        self.grid_logged = False
        self.generated_indices: list[int] = []
        self._measured: list[tuple[Sampler, int]] = []
        self._ref: tuple[np.ndarray, np.ndarray, str] | None = None
        self._pending_step: int | None = None
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
        if self.ema is not None:
            self._run_before(trainer, self.ema)
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

    def _run_before(self, trainer: Trainer, ema: Callback) -> None:
        """Moves this callback before the EMA callback in ``trainer.callbacks``: at ``on_train_end`` the EMA
        callback copies the averaged weights into the module, so the raw ones are gone after it. (Called
        from ``setup`` while Lightning iterates the list: moving an item from position i to j < i leaves
        the items after i, still to be visited, where they are.) Measurements after a step wait for the
        next hook instead, so that the EMA update of that step, whatever the order, is included."""
        callbacks = trainer.callbacks
        mine, theirs = callbacks.index(self), callbacks.index(ema)
        if mine > theirs:
            callbacks.insert(theirs, callbacks.pop(mine))

    def _weights(self) -> list[str]:
        ema = self.use_ema and self.ema is not None
        return (["ema"] if ema else []) + (["raw"] if self.also_raw or not ema else [])

    def _metric(self) -> str:
        return self.metric_name or metric_name_of(self.extractor)

    def _key(self, sampler: Sampler, nfe: int, weights: str) -> str:
        return metric_key(self._metric(), self.num_samples, sampler.name, nfe, weights)

    # -- when --
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._pending_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)
        if self.at_train_end:
            self.evaluate(trainer, pl_module)

    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_step is not None:
            self._pending_step = None
            self.evaluate(trainer, pl_module)

    # -- what --
    def _models(self, pl_module: LightningModule) -> list[tuple[str, DiffusionModule]]:
        return [
            (w, self.ema._average_model.module if w == "ema" else pl_module)  # unwrapped: never trainer.model
            for w in self._weights()
        ]

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Measures every (weights, sampler) now, on every rank; logs on rank 0. Once per global step."""
        step = trainer.global_step
        if trainer.fast_dev_run or step == self._last_step:
            if trainer.fast_dev_run:
                rank_zero_info("FIDCallback: skipped under fast_dev_run")
            return {}
        self._last_step = step
        if self._ref is None:
            self._ref = reference_moments(
                self.reference, trainer.datamodule, self.extractor, self.cache_dir, self.batch_size
            )
        mu_ref, sigma_ref, ref_key = self._ref
        indices = shard(self.num_samples, trainer.global_rank, trainer.world_size)
        show = self.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None
        seeds = f"{self.seed_offset}-{self.seed_offset + self.num_samples - 1}"
        rows = []
        for weights, model in self._models(pl_module):
            with _eval_mode(model):
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
                        keep=0 if self.grid_logged else self.grid_size,
                        progress=show,
                        desc=key,
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
                    if not self.grid_logged:
                        self.grid_logged = True
                        if trainer.is_global_zero and len(gen.images):
                            self._log_grid(trainer, gen.images)
        metrics = {row.key: row.value for row in rows}
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
                lg.save()
            append_rows(Path(trainer.default_root_dir) / CSV_FILE, rows, step=step)
            log.info("step %d: %s", step, ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items()))
        return metrics

    def _log_grid(self, trainer: Trainer, images: Tensor) -> None:
        grid = _grid(images)
        path = Path(trainer.default_root_dir) / GRID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(
                    key="samples_grid", images=[grid.permute(1, 2, 0).numpy()], step=trainer.global_step
                )
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image("samples_grid", grid, global_step=trainer.global_step)

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
        return {"grid_logged": self.grid_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grid_logged = bool(state_dict.get("grid_logged", False))
