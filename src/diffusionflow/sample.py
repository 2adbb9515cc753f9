"""Sample a trained model or the exact mixture oracle: ``python -m diffusionflow.sample [overrides]``.

    python -m diffusionflow.sample ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt sampler=dpmpp_2m
    python -m diffusionflow.sample oracle=blog schedule=cosine sampler=ddpm sampler.steps=100

The sampler is chosen here, independently of training: any ``conf/sampler`` option and its keys. A
checkpoint samples with its EMA weights (``weights=ema``, the default) or its raw ones (``weights=raw``)
and with the schedule and prediction it was trained with; ``oracle=<mixture>`` is the exact denoiser of
a toy Gaussian mixture under ``schedule`` (default flow), in float64 on the CPU, with no network.

Writes to ``out_dir`` (default ``logs/sample/runs/<date>_<time>/``), by ``format`` (default ``npz``):

- ``samples.npz`` (``npz``, ``both``; always for 2-D data): the samples, uint8 (N, H, W, C) images under
  ``arr_0`` (EDM / ADM's layout, rounded by ``metrics.extractors.to_uint8``; ``evaluate sets`` reads it)
  or float (N, D) points under ``samples``; ``labels`` of a class-conditional model, and ``nfe``,
  ``sampler``, ``sampler_options``, ``steps``, ``seed``, ``weights``, ``source`` (and ``guidance``);
- ``samples/000000.png``, … (``png``, ``both``; images only): sample i as ``{i:06d}.png``, lossless;
- ``samples.png``: a scatter over the true law for 2-D data, a mosaic of the first images otherwise;
- for 2-D toy laws, ``metrics.json`` with the toy metrics of training's final evaluation.

A latent model (trained on ``conf/data/latents.yaml``-style data, ``data.vae`` set) is sampled in latent
space and each batch decoded by its VAE (``data.vae``'s config and weights, with the normalisation of its
latent folder ``data.train_dataset``, as training's FID does) before it is written: the outputs are images.

Noise: sample i has its own seed, ``seed + i``, through the generator that training's evaluation, the
FID callback, ``evaluate`` and reflow pairs use (``diffusionflow.metrics.generate``): its initial noise
(drawn in the model's dtype) and a stochastic sampler's fresh noise come from that generator alone, so a
sample depends neither on ``batch_size``, nor on ``num_samples`` (a larger run extends a smaller one), nor
on the number of processes.

Scale: the sampler runs on batches of ``batch_size`` samples and each batch is written as it comes, into
its rows of a memory-mapped ``samples.npy.partial`` and / or its PNG files; at the end the ``.npy`` is
copied, not loaded, into ``samples.npz`` (a zip, stored, as ``np.savez`` writes). No process holds more
than a batch of images, so 50k images take the memory of one batch.

Several processes: ``torchrun --nproc_per_node K -m diffusionflow.sample ... out_dir=<dir>`` starts K
processes (``diffusionflow.distributed``); process r draws the seeds ``shard(N, r, K)`` on
``cuda:LOCAL_RANK`` into the same files, and rank 0 writes the rest once all are done. The outputs are the
ones one process writes. ``out_dir`` must be named (``out_dir=`` or ``hydra.run.dir=``): the default run
folder is named by each process's start time.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm

from diffusionflow.checkpoint import check_weights, load_module
from diffusionflow.checks import SAMPLE, check_config, check_device
from diffusionflow.config import instantiate_checked
from diffusionflow.core.samplers import Denoiser, Sampler
from diffusionflow.core.schedules import Schedule
from diffusionflow.data.toy2d import MIXTURES, Toy2D
from diffusionflow.distributed import Ranks, barrier, close_ranks, gather_objects, init_ranks
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.final_eval import latent_codec
from diffusionflow.metrics.extractors import to_uint8
from diffusionflow.metrics.fid import decode_latents
from diffusionflow.metrics.generate import GenerativeModel, generate_batches, nfe_of, shard
from diffusionflow.metrics.images import image_batches, save_png_folder
from diffusionflow.metrics.pictures import image_mosaic, scatter_plot
from diffusionflow.metrics.toy_samples import toy_metrics
from diffusionflow.nn.vae import LatentCodec
from diffusionflow.paths import CONFIG_DIR, CONFIG_PKG, replace_atomically

__all__ = ["main", "sample", "validate"]

IMAGES_IN_MOSAIC = 100
NPZ, PNG_FOLDER = "samples.npz", "samples"
IMAGES_KEY, POINTS_KEY = "arr_0", "samples"
"""samples.npz's key of uint8 NHWC images (EDM / ADM / torch-fidelity's, read by ``evaluate sets``) and
of float 2-D points (as training's final evaluation writes them)."""
PNG_NAME = re.compile(r"\d{6,}\.png")


class Oracle:
    """The exact denoiser of a Gaussian mixture under ``schedule``, as a model for ``metrics.generate``:
    unconditional, float64, on the CPU."""

    num_classes = 0
    training = False
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, law: Toy2D, schedule: Schedule, sampler: Sampler) -> None:
        self.law, self.schedule, self.sampler = law, schedule, sampler

    def denoiser(self, labels: Tensor | None = None, guidance: float | None = None) -> Denoiser:
        def exact(z: Tensor, t: Tensor) -> Tensor:
            return self.law.mixture.x_hat(z, t, self.schedule)

        return exact

    def eval(self) -> Oracle:
        return self

    def train(self, mode: bool = True) -> Oracle:
        return self


@dataclass(frozen=True)
class Source:
    """What is sampled: ``model`` (a checkpoint's module or the oracle) with ``labels`` per sample."""

    description: str
    weights: str
    model: GenerativeModel
    shape: tuple[int, ...]
    labels: Tensor | None = None
    guidance: float | None = None
    law: Any = None
    """A dataset with ``reference_samples`` (and ``mixture`` when exact) for 2-D data, else None."""
    decode: Callable[[Tensor], Tensor] | None = None
    image_shape: tuple[int, ...] | None = None
    """A latent model's VAE decoder (latents → images in [−1, 1]) and the shape of its images."""

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The shape of one written sample: the decoded image for a latent model, else ``shape``."""
        return self.image_shape or self.shape


def _overrides(group: str) -> list[str]:
    """The command-line overrides of ``group`` or of its keys."""
    if not HydraConfig.initialized():
        return []
    return [
        o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~").split(".")[0] == group
    ]


def _out_dir_given() -> bool:
    """Whether the command line names the output folder (``out_dir=`` or ``hydra.run.dir=``) rather than
    leaving it to the start time; without Hydra, ``out_dir`` is whatever the caller gave."""
    if not HydraConfig.initialized():
        return True
    run_dir = any(o.split("=", 1)[0] == "hydra.run.dir" for o in HydraConfig.get().overrides.hydra)
    return run_dir or bool(_overrides("out_dir"))


def validate(cfg: DictConfig) -> None:
    """Checks of the sampling keys (types and ranges: ``checks.SAMPLE``; ``device`` against this machine's
    devices; under torchrun, a named ``out_dir``), before anything is loaded; the sampler, checkpoint and
    labels are checked when built."""
    if (cfg.ckpt_path is None) == (cfg.oracle is None):
        raise ConfigError(
            "give exactly one of ckpt_path (a checkpoint of diffusionflow.train) and oracle (one of "
            f"{list(MIXTURES)}); got ckpt_path={cfg.ckpt_path} and oracle={cfg.oracle}"
        )
    check_config(cfg, SAMPLE)
    check_weights(cfg.weights)
    check_device(cfg.device)
    if cfg.oracle is not None and cfg.oracle not in MIXTURES:
        raise ConfigError(f"oracle={cfg.oracle!r} has no exact denoiser; allowed: {list(MIXTURES)}")
    if cfg.oracle is not None and "_target_" not in cfg.schedule:
        options = sorted(p.stem for p in (CONFIG_DIR / "schedule").glob("*.yaml") if p.stem != "canonical")
        name = cfg.schedule.get("name")
        raise ConfigError(f"schedule={name} means a weighting's schedule; the oracle needs one of {options}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not _out_dir_given():
        raise ConfigError(
            f"out_dir is the default run folder, named by each process's start time, but under torchrun "
            f"({world} processes) every process must write to one folder: give out_dir=<dir>"
        )
    schedule_overrides = _overrides("schedule")
    if cfg.ckpt_path is not None and schedule_overrides:
        raise ConfigError(
            f"{' '.join(schedule_overrides)}: schedule is for oracle= only; ckpt_path={cfg.ckpt_path} "
            "samples with the schedule it was trained with"
        )


def _labels(cfg: DictConfig, num_classes: int, description: str) -> Tensor | None:
    """The class of every sample (None for an unconditional source), after checking ``labels`` and
    ``guidance`` against ``num_classes``."""
    if num_classes == 0:
        if cfg.labels is not None or cfg.guidance not in (None, 1.0):
            key = "labels" if cfg.labels is not None else "guidance"
            raise ConfigError(
                f"{key}={cfg[key]} needs a class-conditional model, but {description} is unconditional; "
                f"allowed: {key}=null"
            )
        return None
    spec = cfg.labels
    classes = list(range(num_classes)) if spec is None else [spec] if isinstance(spec, int) else list(spec)
    if not classes or not all(isinstance(c, int) and 0 <= c < num_classes for c in classes):
        raise ConfigError(f"labels={cfg.labels} must be class indices in [0, {num_classes})")
    return torch.tensor(classes)[torch.arange(cfg.num_samples) % len(classes)]


def _checkpoint_source(cfg: DictConfig, device: torch.device) -> Source:
    module = load_module(cfg.ckpt_path, cfg.weights, map_location=device, sampler=cfg.sampler)
    description = f"checkpoint {cfg.ckpt_path}"
    labels = _labels(cfg, module.num_classes, description)
    if labels is not None:
        labels = labels.to(device)
    data = module.hparams["config"]["data"]
    shape = tuple(data["shape"])
    law = instantiate_checked(data["train_dataset"], "data.train_dataset")() if len(shape) == 1 else None
    codec = _latent_codec(data, description, device) if data.get("vae") else None
    return Source(
        description=description,
        weights=cfg.weights,
        model=module,
        shape=shape,
        labels=labels,
        guidance=module.guidance if cfg.guidance is None else float(cfg.guidance),
        law=law,
        decode=None if codec is None else codec.decode,
        image_shape=None if codec is None else codec.image_shape(shape),
    )


def _latent_codec(data: DictConfig, description: str, device: torch.device) -> LatentCodec:
    """The VAE of a latent checkpoint's ``data.vae`` with the normalisation of its latent folder (its
    ``meta.json``), built as training's evaluation builds it; a ConfigError names what is missing."""
    try:
        datamodule = instantiate_checked(data, "data")
        datamodule.setup("fit")
        codec, _ = latent_codec(datamodule)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(
            f"{description} samples latents of data.vae.config={data.vae.config}; decoding them needs that "
            f"VAE's weights (data.vae.weights_path={data.vae.get('weights_path')}) and the latent folder it "
            f"was trained on (data.train_dataset, for the normalisation): {err}"
        ) from err
    return codec.to(device).eval()


def _oracle_source(cfg: DictConfig) -> Source:
    description = f"oracle {cfg.oracle}"
    _labels(cfg, 0, description)  # the oracle is unconditional: rejects labels and guidance
    law = Toy2D(cfg.oracle, n=1)  # only its law is used: mixture and reference_samples
    schedule: Schedule = instantiate_checked(cfg.schedule, "schedule")
    return Source(
        description=description,
        weights="exact",
        model=Oracle(law, schedule, instantiate_checked(cfg.sampler, "sampler")),
        shape=(law.mixture.dim,),
        law=law,
    )


class Rows:
    """``out_dir/samples.npy.partial``: the (N, …) array every rank fills with its rows, memory-mapped
    (created by rank 0, opened by the others after a barrier), so no process holds all N samples."""

    def __init__(self, out_dir: Path, shape: tuple[int, ...], dtype: np.dtype, ranks: Ranks) -> None:
        self.path = out_dir / "samples.npy.partial"
        if ranks.is_main:
            np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=shape).flush()
        barrier(ranks)
        self.array = np.lib.format.open_memmap(self.path, mode="r+")

    def pack(self, npz: Path, key: str, arrays: dict[str, Any]) -> None:
        """Writes ``npz`` (atomically): this array as ``key``, copied from its file (never loaded), and
        ``arrays``, as ``np.savez`` does (a zip, stored); then removes the ``.npy``."""
        self.array.flush()

        def write(f: BinaryIO) -> None:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.write(self.path, f"{key}.npy")
                for name, value in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as entry:
                        np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)

        replace_atomically(npz, write)
        del self.array
        self.path.unlink()


def _draw(source: Source, cfg: DictConfig, ranks: Ranks, out_dir: Path, rows: Rows | None) -> None:
    """This rank's samples ``shard(N, rank, world)``, batch by batch: each batch goes to its rows of
    ``rows`` (uint8 NHWC for images, the float samples for 2-D data) and, for ``format`` png or both, to
    ``out_dir/samples/<index>.png``; nothing is kept."""
    mine = shard(int(cfg.num_samples), ranks.rank, ranks.world)
    images = len(source.out_shape) == 3
    pngs = images and cfg.format in ("png", "both")
    labels = None if source.labels is None else source.labels[mine.start : mine.stop]
    batches = generate_batches(
        source.model,
        mine,
        shape=source.shape,
        batch_size=int(cfg.batch_size),
        seed_offset=int(cfg.seed),
        labels=labels,
        guidance=source.guidance,
    )
    desc = "sampling" if ranks.world == 1 else f"sampling (rank 0 of {ranks.world})"
    with tqdm(total=len(mine), desc=desc, unit="img", disable=None if ranks.is_main else True) as bar:
        for idx, x in batches:
            if source.decode is not None:
                x = decode_latents(source.decode, x, x.device)
            batch = to_uint8(x).cpu() if images else x.cpu()
            if rows is not None:
                rows.array[idx[0] : idx[-1] + 1] = (batch.permute(0, 2, 3, 1) if images else batch).numpy()
            if pngs:
                save_png_folder(batch, out_dir / PNG_FOLDER, start=idx[0])
            bar.update(len(idx))
    if rows is not None:
        rows.array.flush()  # to the file, before rank 0 reads it


def _metadata(source: Source, cfg: DictConfig) -> dict[str, Any]:
    """The extra arrays of samples.npz: how the samples were drawn."""
    sampler = source.model.sampler
    arrays: dict[str, Any] = {
        "nfe": nfe_of(sampler, source.model.schedule),
        "sampler": sampler.name,
        "sampler_options": repr(sampler),
        "steps": sampler.steps,
        "seed": cfg.seed,
        "weights": source.weights,
        "source": source.description,
    }
    if source.labels is not None:
        arrays |= {"labels": source.labels.cpu().numpy(), "guidance": source.guidance}
    return arrays


def _mosaic(out_dir: Path, rows: Rows | None, n: int) -> Tensor:
    """The first ``IMAGES_IN_MOSAIC`` images in [−1, 1], NCHW, read back from what was written."""
    k = min(n, IMAGES_IN_MOSAIC)
    if rows is not None:
        first = torch.from_numpy(np.array(rows.array[:k])).permute(0, 3, 1, 2)
    else:
        first = next(image_batches(out_dir / PNG_FOLDER, batch_size=k, limit=k))
    return first.float() / 127.5 - 1


def _finish(out_dir: Path, source: Source, cfg: DictConfig, rows: Rows | None) -> dict[str, float]:
    """Rank 0, once every rank has written its rows: samples.npz, samples.png and, for 2-D data,
    metrics.json (whose metrics are returned)."""
    n = int(cfg.num_samples)
    arrays = _metadata(source, cfg)
    if source.law is None:
        image_mosaic(_mosaic(out_dir, rows, n), out_dir / "samples.png")
        if rows is not None:
            rows.pack(out_dir / NPZ, IMAGES_KEY, arrays)
        return {}
    assert rows is not None  # 2-D data are always written to samples.npz
    samples = torch.from_numpy(np.array(rows.array))
    rows.pack(out_dir / NPZ, POINTS_KEY, arrays)
    scatter_plot(samples, source.law, out_dir / "samples.png")
    metrics = {"nfe": float(arrays["nfe"]), **toy_metrics(samples, source.law, n, cfg.seed)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _shared_out_dir(cfg: DictConfig, ranks: Ranks) -> Path:
    """``cfg.out_dir``, the same folder on every rank (a ``ConfigError`` on all of them otherwise)."""
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    seen = gather_objects(ranks, str(out_dir))
    if len(set(seen)) > 1:
        listed = ", ".join(f"rank {r}: {d}" for r, d in enumerate(seen))
        raise ConfigError(
            f"out_dir differs between the {ranks.world} processes ({listed}); they must write to one "
            "folder: give out_dir=<dir>"
        )
    return out_dir


def _rows_layout(source: Source, cfg: DictConfig) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype of samples.npz's samples: uint8 (N, H, W, C) images, the model's float
    (N, D) points, or None when ``format=png`` writes images as PNG files only."""
    n = int(cfg.num_samples)
    if len(source.out_shape) == 3:
        c, h, w = source.out_shape
        return None if cfg.format == "png" else ((n, h, w, c), np.dtype(np.uint8))
    if cfg.format != "npz":
        raise ConfigError(
            f"format={cfg.format}: {source.description} samples {source.shape[0]}-D points, not images; "
            "allowed for points: format=npz"
        )
    return (n, *source.shape), torch.empty(0, dtype=source.model.dtype).numpy().dtype


def _prepare(out_dir: Path, cfg: DictConfig) -> None:
    """Rank 0: makes ``out_dir`` and, for PNG output, empties ``samples/`` of the PNGs of an earlier run
    (a smaller ``num_samples`` would otherwise leave extra images in the set)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir / PNG_FOLDER
    if cfg.format != "npz" and folder.is_dir():
        for old in folder.iterdir():
            if PNG_NAME.fullmatch(old.name):
                old.unlink()


def sample(cfg: DictConfig) -> dict[str, float]:
    """Checks ``cfg``, samples (this process's share of the seeds under torchrun), writes the outputs to
    ``cfg.out_dir``; returns the toy metrics (or {}, and {} on every rank but 0)."""
    validate(cfg)
    ranks = init_ranks(cfg.device)
    try:
        out_dir = _shared_out_dir(cfg, ranks)
        source = _oracle_source(cfg) if cfg.oracle is not None else _checkpoint_source(cfg, ranks.device)
        layout = _rows_layout(source, cfg)
        if ranks.is_main:
            _prepare(out_dir, cfg)
        barrier(ranks)
        rows = None if layout is None else Rows(out_dir, *layout, ranks)
        _draw(source, cfg, ranks, out_dir, rows)
        barrier(ranks)
        if not ranks.is_main:
            return {}
        metrics = _finish(out_dir, source, cfg, rows)
        sampler = source.model.sampler
        written = [out_dir / NPZ] * (rows is not None) + [out_dir / PNG_FOLDER] * (cfg.format != "npz")
        print(
            f"{cfg.num_samples} samples from {source.description} ({source.weights}) with {sampler.name}, "
            f"{sampler.steps} steps, NFE {sampler.nfe}{', decoded by its VAE' * (source.decode is not None)} "
            f"-> {', '.join(map(str, written))}"
        )
        return metrics
    finally:
        close_ranks(ranks)


@hydra.main(version_base="1.3", config_path=CONFIG_PKG, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
