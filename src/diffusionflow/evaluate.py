"""Evaluate checkpoints and image sets: ``python -m diffusionflow.evaluate {samplers,nll,sets,prefetch}``.

    python -m diffusionflow.evaluate samplers --ckpt logs/train/runs/<run>/checkpoints/last.ckpt \\
        --samplers heun:18,ddim:10,ddim:20 --num-samples 50000 --metric fid --out logs/eval/<run>
    torchrun --nproc_per_node 8 -m diffusionflow.evaluate samplers --ckpt '<run>/checkpoints/*.ckpt' \\
        --samplers heun:32 --guidance 1,1.5,2 --ema-sigma-rel 0.05,0.1,0.15 --metric fid --out <run>/eval
    python -m diffusionflow.evaluate nll --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --method ode,elbo
    python -m diffusionflow.evaluate sets samples.npz cifar10-train/ --fid --kid --isc --json out.json
    python -m diffusionflow.evaluate prefetch [--dest DIR]

``samplers`` measures the grid checkpoints × weights × samplers × guidance scales: ``--ckpt`` a file, a
folder or a glob of one run's checkpoints (rows carry the training images seen, steps × global batch),
``--weights ema,raw`` and/or post-hoc EMA widths ``--ema-sigma-rel``, ``--samplers`` name:steps and
``--guidance`` classifier-free guidance scales. Every row has the same per-sample seeds
(``diffusionflow.metrics.generate``) and reference statistics as training's ``FIDCallback`` (so a row and
the callback's value at that checkpoint agree); they are written to ``grid.csv`` and plotted against NFE
in ``fid_vs_nfe.png`` (and against training images and guidance, ``fid_vs_train_images.png`` and
``fid_vs_guidance.png``, when those vary). Several GPUs: start it with ``torchrun`` (plain
``torch.distributed``, as the training FID, not Fabric: no extra launcher or wrapper for a loop that only
generates and sums); each process draws its shard of the seeds and the float64 feature sums are
all-reduced, so ``grid.csv`` does not depend on the number of processes; rank 0 writes it.
``--metric`` is ``fid`` (Inception), ``fd_digits`` (the digits classifier) or
``toy`` (sliced W2, energy distance and exact log-density on 2-D data); a latent model's samples and its
reference set are decoded by its VAE first, as training's FID does. ``nll`` estimates the negative
log-likelihood of points of the run's own data set through the probability-flow ODE and the ELBO
(``diffusionflow.nll``), in nats and bits/dim, written to ``nll.json``. ``sets`` is
torch-fidelity's command line on two image sets (a PNG folder or a uint8 NHWC ``.npz``), with its JSON
key names. ``prefetch`` is the only command that uses the network: it downloads the Inception weights,
which nothing else ever does.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig, OmegaConf

from diffusionflow.checkpoint import (
    POSTHOC,
    WEIGHTS,
    check_ckpt_path,
    check_posthoc,
    load_module,
    posthoc_sigma_rel,
)
from diffusionflow.checks import check_device
from diffusionflow.config import instantiate_checked
from diffusionflow.core.posthoc_ema import SIGMA_REL_MAX
from diffusionflow.distributed import Ranks, barrier, close_ranks, gather_objects, init_ranks
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import read_checkpoint
from diffusionflow.lightning.final_eval import latent_codec
from diffusionflow.metrics.digits_classifier import DigitsClassifier, default_cache_dir
from diffusionflow.metrics.extractors import (
    EXTRACTORS,
    PRETRAINED,
    WEIGHTS_FILENAME,
    DinoV2,
    InceptionV3,
    PretrainedWeights,
    TorchFidelityExtractor,
    build_extractor,
    default_weights_path,
)
from diffusionflow.metrics.fid import (
    REFERENCE_SPLITS,
    EvalRow,
    append_rows,
    describe_dataset,
    generate_features,
    metric_key,
    metric_name_of,
    reference_moments,
)
from diffusionflow.metrics.frechet import FrechetStats, frechet_distance
from diffusionflow.metrics.generate import generate, nfe_of, parse_samplers, shard
from diffusionflow.metrics.toy_samples import toy_metrics
from diffusionflow.nll import METHODS, data_points, exact_nll, nll_estimates, prepare, summary
from diffusionflow.nn.vae import PUBLISHED

__all__ = ["build_parser", "main", "nll", "prefetch", "samplers", "sets"]

log = logging.getLogger(__name__)

METRICS = ("fid", "fd_digits", "toy")
PREFETCH = "python -m diffusionflow.evaluate prefetch"
_SD_VAE = PUBLISHED["sd-vae-ft-ema"]
PREFETCH_FILES = {
    **PRETRAINED,
    _SD_VAE.prefetch_key: PretrainedWeights(
        what=f"SD VAE ({_SD_VAE.hub_id})",
        key=_SD_VAE.prefetch_key,
        filename=_SD_VAE.filename,
        url=_SD_VAE.url,
        options="`--vae-weights` (encode) / `data.vae.weights_path` (config)",
    ),
}
"""``prefetch --what`` key → weights file: the metrics' networks and the SD VAE of the latent data."""
SAMPLERS_CSV, SAMPLERS_PNG, NLL_JSON = "grid.csv", "fid_vs_{axis}.png", "nll.json"
"""``grid.csv``: the name ``diffusionflow.compare`` collects (``**/grid.csv``) beside ``eval/fid.csv``."""


class CommandError(ValueError):
    """Bad input or a missing resource, reported as ``error: ...`` with exit status 2."""


# ---- shared ------------------------------------------------------------------------------------------
def _device(name: str | None) -> torch.device:
    """``--device`` (None: cuda when available, else cpu), checked against this machine's devices
    before anything is loaded onto it."""
    return check_device(name, "--device")


def _inception(weights: str | None, device: torch.device) -> InceptionV3:
    """Inception-v3 from ``weights`` (a file) or the torch.hub cache; a missing file names the file,
    its folder and the command that fetches it."""
    path = Path(weights).expanduser() if weights else default_weights_path()
    if not path.is_file():
        raise CommandError(
            f"Inception weights {path.name} not found in {path.parent}. Nothing downloads them implicitly: "
            f"run `{PREFETCH} --dest {path.parent}` on a machine with internet (or copy "
            f"{WEIGHTS_FILENAME} there), or pass --inception-weights FILE"
        )
    return InceptionV3(path).to(device)


# ---- samplers ----------------------------------------------------------------------------------------
AXES = {"nfe": "NFE", "train_images": "training images", "guidance": "guidance scale"}
"""The x axes of the grid's pictures, ``fid_vs_<axis>.png``: NFE always, the others when they vary."""
SAME_DATA = ("shape", "num_classes", "train_dataset", "val_dataset")
"""What the checkpoints of one grid share: the reference statistics are those of this data."""


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint of the run and the number of training images its weights had seen."""

    path: Path
    train_images: int | None


@dataclass(frozen=True)
class GridPoint:
    """One cell of the grid: checkpoint × weights × sampler × guidance scale."""

    snapshot: Snapshot
    weights: str
    sampler: Any
    nfe: int
    guidance: float | None


def _numbers(flag: str, text: str | None, allowed: str, ok: Callable[[float], bool]) -> list[float]:
    """The distinct comma-separated numbers of ``flag`` (none when it is not given), each passing ``ok``."""
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values) or not all(math.isfinite(v) and ok(v) for v in values):
        raise CommandError(f"{flag} {text}: allowed a comma-separated list of distinct {allowed}")
    return values


def _weights_axis(args: argparse.Namespace) -> list[str]:
    """``--weights`` (default ``ema``, none when only ``--ema-sigma-rel`` is given), then ``sigma_rel:x``
    for each x of ``--ema-sigma-rel``: the post-hoc EMA of that width (EDM2) that ``load_module``
    reconstructs from the run's snapshots."""
    sigma_rels = _numbers(
        "--ema-sigma-rel",
        args.ema_sigma_rel,
        f"numbers in (0, {SIGMA_REL_MAX:.4f}), the widths of power-function EMA profiles, e.g. 0.05,0.1",
        lambda v: 0 < v < SIGMA_REL_MAX,
    )
    named = args.weights.split(",") if args.weights else [] if sigma_rels else ["ema"]
    if any(w not in WEIGHTS for w in named) or len(set(named)) != len(named):
        raise CommandError(
            f"--weights {args.weights}: allowed a comma-separated list of distinct values from "
            f"{list(WEIGHTS)}"
        )
    return named + [f"{POSTHOC}{x}" for x in sigma_rels]


def _checkpoint_files(spec: str) -> list[Path]:
    """``--ckpt``: a file, a folder (its ``*.ckpt``) or a glob; a folder or glob that matches no file is
    an error naming it."""
    check_ckpt_path(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files, why = sorted(path.glob("*.ckpt")), "the folder holds no *.ckpt file"
    elif any(c in spec for c in "*?["):
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file())
        why = "the pattern matches no file"
    else:
        return [path]
    if not files:
        raise CommandError(
            f"--ckpt {spec}: {why}; allowed: a checkpoint file, a folder of checkpoints or a quoted glob of "
            "checkpoints of one run"
        )
    return files


def _snapshots(
    files: Sequence[Path], weights: Sequence[str], args: argparse.Namespace
) -> tuple[list[Snapshot], DictConfig]:
    """Every checkpoint checked with every weights before any sampling (``load_module``, or
    ``check_posthoc`` for a post-hoc width, which reads no weights); in the order of training images
    (optimizer steps × ``data.batch_size``, the global batch, × ``trainer.accumulate_grad_batches``).
    ``--guidance`` needs class-conditional checkpoints, and all must have the first's data sets
    (``SAME_DATA``: one reference) but may differ in batch size (a resume may change it).
    A ``last.ckpt`` of the same step as another file is that file again: left out. Also returns the
    first checkpoint's ``data`` config."""
    snapshots, data = [], None
    for path in files:
        ckpt = read_checkpoint(path, mmap=True)  # a file that is not a checkpoint: load_module's error
        for w in weights:
            sigma_rel = posthoc_sigma_rel(w)
            if sigma_rel is None:
                load_module(path, w)
            else:
                check_posthoc(path, sigma_rel)
        config = ckpt.get("hyper_parameters", {}).get("config")
        if not config:  # only post-hoc widths, which check_posthoc reads without the run config
            raise CommandError(f"--ckpt {args.ckpt}: {path} stores no run config (hyper_parameters.config)")
        cfg = OmegaConf.create(config)
        if args.guidance is not None and not cfg.data.num_classes:
            raise CommandError(
                f"--guidance {args.guidance}: {path} is an unconditional checkpoint (data.num_classes=0); "
                "classifier-free guidance needs a class-conditional one"
            )
        if data is not None and any(cfg.data.get(k) != data.get(k) for k in SAME_DATA):
            raise CommandError(
                f"--ckpt {args.ckpt}: {path} was trained on other data than {snapshots[0].path} (data."
                f"{'/'.join(SAME_DATA)}); allowed: checkpoints of one run"
            )
        data = cfg.data if data is None else data
        step = ckpt.get("global_step")
        batch = int(cfg.data.batch_size) * int(cfg.trainer.get("accumulate_grad_batches") or 1)
        snapshots.append(Snapshot(path, None if step is None else int(step) * batch))
    steps = {s.train_images for s in snapshots if s.path.name != "last.ckpt"}
    snapshots = [s for s in snapshots if s.path.name != "last.ckpt" or s.train_images not in steps]
    return sorted(snapshots, key=lambda s: (s.train_images or 0, str(s.path))), data


def _key(metric: str, point: GridPoint, args: argparse.Namespace) -> str:
    """``metric_key``, with ``_cfg<scale>`` when ``--guidance`` sets the scale."""
    key = metric_key(metric, args.num_samples, point.sampler.name, point.nfe, point.weights)
    return key if point.guidance is None else f"{key}_cfg{point.guidance:g}"


def _row(metric: str, value: float, point: GridPoint, args: argparse.Namespace, reference: str) -> EvalRow:
    return EvalRow(
        key=_key(metric, point, args),
        metric=metric,
        value=value,
        num_samples=args.num_samples,
        sampler=point.sampler.name,
        steps=point.sampler.steps,
        nfe=point.nfe,
        seeds=f"{args.seed_offset}-{args.seed_offset + args.num_samples - 1}",
        weights=point.weights,
        reference=reference,
        sampler_config=repr(point.sampler),
        guidance=point.guidance,
        train_images=point.snapshot.train_images,
    )


def _toy_rows(
    module: Any, point: GridPoint, datamodule: Any, ranks: Ranks, args: argparse.Namespace
) -> list[EvalRow]:
    """Sliced W2, energy distance (and their floors) and exact log-densities of 2-D samples: each rank
    draws its shard of the seeds, every rank scores all of them."""
    mine = generate(
        module,
        shard(args.num_samples, ranks.rank, ranks.world),
        shape=datamodule.shape,
        batch_size=args.batch_size,
        seed_offset=args.seed_offset,
        sampler=point.sampler,
    )
    samples = torch.cat(gather_objects(ranks, mine))
    dataset = datamodule.train_set
    reference = json.dumps(
        {
            "dataset": describe_dataset(datamodule.train_factory, dataset),
            "reference_seeds": [args.seed_offset + 1, args.seed_offset + 2],
        }
    )
    return [
        _row(name, value, point, args, reference)
        for name, value in toy_metrics(samples, dataset, args.num_samples, args.seed_offset).items()
    ]


def _fd_row(
    module: Any,
    point: GridPoint,
    extractor: Any,
    moments: tuple[Any, Any, str],
    shape: Sequence[int],
    ranks: Ranks,
    args: argparse.Namespace,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalRow:
    """The Fréchet distance of one grid point: each rank generates its shard of the seeds (latents
    decoded by ``decode``), the float64 feature sums are all-reduced (as ``FIDCallback`` does), so the
    value does not depend on the ranks."""
    metric = metric_name_of(extractor)
    gen = generate_features(
        module,
        point.sampler,
        shard(args.num_samples, ranks.rank, ranks.world),
        extractor,
        shape=shape,
        batch_size=args.batch_size,
        seed_offset=args.seed_offset,
        progress=ranks.is_main,
        desc=_key(metric, point, args),
        decode=decode,
    )
    gen.stats.all_reduce()
    mu, sigma, reference = moments
    return _row(metric, frechet_distance(*gen.stats.mean_cov(), mu, sigma), point, args, reference)


def _digits_classifier(cache: Path, ranks: Ranks) -> DigitsClassifier:
    """The cached digits classifier, built by rank 0 first (a cache miss trains it once)."""
    if not ranks.is_main:
        barrier(ranks)
    classifier = DigitsClassifier(cache).to(ranks.device)
    if ranks.is_main:
        barrier(ranks)
    return classifier


def _plot(rows: Sequence[EvalRow], path: Path, x: str = "nfe") -> None:
    """Metric vs ``x`` (one of ``AXES``), one panel per metric, one line per setting of the other axes
    that vary (a ``*_floor`` or ``*_data`` metric is drawn as a dashed line in its metric's panel)."""
    metrics = [m for m in dict.fromkeys(r.metric for r in rows) if not m.endswith(("_floor", "_data"))]
    others = [f for f in ("nfe", "weights", "guidance", "train_images") if f != x]
    varying = ["sampler"] + [f for f in others if len({getattr(r, f) for r in rows}) > 1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.metric == metric and getattr(r, x) is not None:
                label = " ".join(r.sampler if f == "sampler" else f"{f}={getattr(r, f)}" for f in varying)
                lines.setdefault(label, []).append((getattr(r, x), r.value))
        for label, points in lines.items():
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
        floors = [r.value for r in rows if r.metric in (f"{metric}_floor", f"{metric}_data")]
        if floors:
            ax.axhline(sum(floors) / len(floors), color="grey", linestyle="--", label="reference level")
        if x != "guidance" and min(p for pts in lines.values() for p, _ in pts) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(AXES[x])
        ax.set_ylabel(metric)
        weights = {r.weights for r in rows}
        ax.set_title(
            f"{metric}, {rows[0].num_samples} samples"
            + (f", {weights.pop()} weights" if len(weights) == 1 else "")
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(groups: Sequence[tuple[Snapshot, list[EvalRow]]], out: Path) -> None:
    """``grid.csv`` (a ``checkpoint`` column first) and a picture per axis that varies."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SAMPLERS_CSV).unlink(missing_ok=True)
    for snapshot, rows in groups:
        append_rows(out / SAMPLERS_CSV, rows, checkpoint=str(snapshot.path))
    rows = [r for _, group in groups for r in group]
    pictures = [a for a in AXES if a == "nfe" or len({getattr(r, a) for r in rows} - {None}) > 1]
    for axis in pictures:
        _plot(rows, out / SAMPLERS_PNG.format(axis=axis), axis)
    for row in rows:
        print(f"{row.key}\t{row.value:.6g}")
    print(f"wrote {out / SAMPLERS_CSV} and {', '.join(SAMPLERS_PNG.format(axis=a) for a in pictures)}")


def _measure(
    snapshot: Snapshot,
    weights: Sequence[str],
    measured: Sequence[Any],
    guidance: Sequence[float],
    score: Callable[[Any, GridPoint], list[EvalRow]],
    device: torch.device,
) -> list[EvalRow]:
    """The rows of one checkpoint: each weights × sampler × guidance scale (none given: the run's)."""
    rows = []
    for w in weights:
        module = load_module(snapshot.path, w, map_location=device)
        own = module.guidance
        for sampler in measured:
            nfe = nfe_of(sampler, module.schedule)
            for g in guidance or [None]:
                module.guidance = own if g is None else g  # the scale generation uses
                rows += score(module, GridPoint(snapshot, w, sampler, nfe, g))
    return rows


def samplers(args: argparse.Namespace) -> list[EvalRow]:
    """The grid checkpoints × weights × ``--samplers`` × ``--guidance``: every input checked before any
    sampling, the extractor and the reference statistics loaded once; rank 0 writes ``grid.csv`` and
    ``fid_vs_<axis>.png``. Under torchrun each rank measures its shard of the seeds."""
    if args.num_samples < 2 or args.batch_size < 1 or args.seed_offset < 0:
        raise CommandError(
            f"--num-samples {args.num_samples} must be >= 2, --batch-size {args.batch_size} >= 1 and "
            f"--seed-offset {args.seed_offset} >= 0"
        )
    try:
        measured = parse_samplers(args.samplers.split(","))
    except ValueError as err:
        raise CommandError(f"--samplers {args.samplers}: {err}") from err
    if len(set(args.samplers.split(","))) != len(measured):
        raise CommandError(f"--samplers {args.samplers}: a sampler is named twice")
    guidance = _numbers(
        "--guidance", args.guidance, "numbers >= 0 (1: no guidance), e.g. 1,1.5,2", lambda v: v >= 0
    )
    weights = _weights_axis(args)
    if args.reference not in REFERENCE_SPLITS and not Path(args.reference).is_file():
        raise CommandError(f"--reference {args.reference}: neither train, val nor an .npz file")
    files = _checkpoint_files(args.ckpt)
    ranks = init_ranks(args.device, "--device")
    try:
        inception = _inception(args.inception_weights, ranks.device) if args.metric == "fid" else None
        snapshots, data = _snapshots(files, weights, args)
        datamodule = instantiate_checked(data, "data")
        datamodule.setup("fit")
        shape = list(datamodule.shape)
        latent = latent_codec(datamodule)  # latent data: samples and reference decoded by the VAE
        decode = decoder = None
        if latent is not None:
            codec, decoder = latent[0].to(ranks.device).eval(), latent[1]
            decode = codec.decode
        images = shape if latent is None else list(codec.image_shape(shape))
        fits = {
            "toy": len(images) == 1,
            "fid": len(images) == 3,
            "fd_digits": images[:1] == [1] and len(images) == 3,
        }
        if not fits[args.metric]:
            raise CommandError(
                f"--metric {args.metric} does not fit samples of shape {images} "
                f"({data.train_dataset._target_}); "
                f"allowed: {[m for m, ok in fits.items() if ok]}"
            )
        if args.metric == "toy":

            def score(module: Any, point: GridPoint) -> list[EvalRow]:
                return _toy_rows(module, point, datamodule, ranks, args)
        else:
            extractor = inception or _digits_classifier(Path(args.cache_dir), ranks)
            moments = reference_moments(
                args.reference, datamodule, extractor, args.cache_dir, args.batch_size, decode, decoder
            )

            def score(module: Any, point: GridPoint) -> list[EvalRow]:
                return [_fd_row(module, point, extractor, moments, shape, ranks, args, decode)]

        groups = [(s, _measure(s, weights, measured, guidance, score, ranks.device)) for s in snapshots]
        if ranks.is_main:
            _write(groups, Path(args.out))
        return [r for _, rows in groups for r in rows]
    finally:
        close_ranks(ranks)


# ---- nll ---------------------------------------------------------------------------------------------
def _check_nll_args(args: argparse.Namespace) -> list[str]:
    """The methods of ``--method``; a CommandError naming the flag for bad input."""
    methods = [m.strip() for m in args.method.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise CommandError(
            f"--method {args.method}: allowed a comma-separated list of distinct methods from {list(METHODS)}"
        )
    numbers = {
        "--num-samples": (args.num_samples, 2),
        "--steps": (args.steps, 1),
        "--points": (args.points, 1),
        "--probes": (args.probes, 1),
        "--batch-size": (args.batch_size, 1),
        "--seed": (args.seed, 0),
    }
    for flag, (value, least) in numbers.items():
        if value < least:
            raise CommandError(f"{flag} {value} must be >= {least}")
    return methods


def _nll_line(name: str, s: dict[str, Any]) -> str:
    """``name  nll m ± se nats, m ± se bits/dim  settings``."""
    if name == "ode":
        probes = f", {s['probes']} probe(s)" if s["probes"] else ""
        detail = f"RK4 {s['steps']} steps ({s['nfe']} NFE), {s['divergence']} divergence{probes}"
        detail += f", t from {s['t_min']:g} to {s['t_max']:g}"
    elif name == "elbo":
        detail = f"{s['points']} Gauss–Legendre nodes, λ in [{s['logsnr_min']:g}, {s['logsnr_max']:g}]"
    else:
        detail = "the mixture's exact log-density at these points"
    if "excess_nats" in s:
        detail += f"; {s['excess_nats']:+.4f} ± {s['excess_nats_sem']:.4f} nats over the exact value"
    return (
        f"{name}\tnll {s['nll_nats']:.4f} ± {s['nll_nats_sem']:.4f} nats, "
        f"{s['bits_per_dim']:.4f} ± {s['bits_per_dim_sem']:.4f} bits/dim\t{detail}"
    )


def nll(args: argparse.Namespace) -> dict[str, Any]:
    """NLL of ``--num-samples`` points of the run's ``--split`` by each ``--method``; writes ``nll.json``
    and prints one line per method (and, for a Gaussian mixture, the exact values of the same points)."""
    methods = _check_nll_args(args)
    device = _device(args.device)
    module = load_module(args.ckpt, args.weights, map_location=device)
    cfg = OmegaConf.create(module.hparams["config"])
    datamodule = instantiate_checked(cfg.data, "data")
    factory = datamodule.train_factory if args.split == "train" else datamodule.val_factory
    if factory is None:
        raise CommandError(
            f"--split {args.split}: the run's data config ({cfg.data.train_dataset._target_}) has no "
            "val_dataset; allowed: train"
        )
    dataset = factory()
    if args.num_samples > len(dataset):
        raise CommandError(
            f"--num-samples {args.num_samples} exceeds the {len(dataset)} points of the {args.split} split"
        )
    x, labels = data_points(dataset, args.num_samples, args.seed)
    dtype = torch.float64 if x.ndim == 2 else torch.float32  # 2-D toy data: float64 is cheap
    module = module.to(dtype).requires_grad_(False)
    x, data_info = prepare(x.to(dtype), args.seed)
    labels = labels.to(device) if module.num_classes else None
    estimates = nll_estimates(
        module,
        x.to(device),
        labels,
        methods,
        steps=args.steps,
        points=args.points,
        probes=args.probes,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    dim, offset = x[0].numel(), data_info["offset_bits"]
    result: dict[str, Any] = {
        "checkpoint": str(args.ckpt),
        "weights": args.weights,
        "dataset": describe_dataset(factory, dataset),
        "split": args.split,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "conditional": labels is not None,
        **data_info,
    }
    exact = exact_nll(dataset, x, module.schedule)
    reference = None if exact is None else exact["data"]
    result["methods"] = {
        m: {**summary(e.pop("nll"), dim, offset, reference), **e} for m, e in estimates.items()
    }
    lines = [_nll_line(m, result["methods"][m]) for m in methods]
    if exact is not None:
        result["exact"] = {key: summary(value, dim, offset) for key, value in exact.items()}
        lines.append(_nll_line("exact", result["exact"]["data"]))
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / NLL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / NLL_JSON}")
    return result


# ---- sets --------------------------------------------------------------------------------------------
def _features(net: TorchFidelityExtractor, source: str, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The extractor's outputs (Inception: features and logits; else features) for every image of a PNG
    folder or ``.npz``."""
    from diffusionflow.metrics.images import image_batches

    outputs = [net.outputs(batch) for batch in image_batches(source, batch_size)]
    return tuple(torch.cat([t.cpu() for t in ts]) for ts in zip(*outputs, strict=True))


def _warn_if_singular(count: int, net: TorchFidelityExtractor) -> None:
    if count < net.feature_dim:
        log.warning(
            "%d images < %d %s features: the covariance is singular and the Fréchet distance is biased "
            "upward; papers use 50k samples",
            count,
            net.feature_dim,
            net.name,
        )


def _frechet(features: Sequence[torch.Tensor]) -> float:
    moments = []
    for f in features:
        stats = FrechetStats(f.shape[1])
        stats.update(f)
        moments += stats.mean_cov()
    return frechet_distance(*moments)


def _set_sizes(args: argparse.Namespace) -> list[int]:
    """The number of images of each set, after checking every image's size (file headers only): one
    size per set, the same size in both (INPUT2 only when a metric reads it) unless
    ``--allow-size-mismatch``. Unreadable files are named."""
    from diffusionflow.metrics.images import image_sizes

    both = args.fid or args.kid or args.fd_dinov2 or args.prc
    try:
        scans = [image_sizes(source) for source in (args.input1, args.input2)]
        sizes = [scan.single() for scan in (scans if both else scans[:1])]
    except ValueError as err:
        raise CommandError(str(err)) from err
    if both and sizes[0] != sizes[1]:
        (h1, w1), (h2, w2) = sizes
        what = (
            f"INPUT1 {scans[0].source} holds {h1}x{w1} images and INPUT2 {scans[1].source} {h2}x{w2} "
            "(height x width)"
        )
        if not args.allow_size_mismatch:
            raise CommandError(
                f"{what}: a distance between sets of different resolutions measures the resolution too "
                "(the extractor resizes both to its own input size, so nothing else stops it); make the "
                "sets the same size, or pass --allow-size-mismatch to compare them anyway"
            )
        log.warning("%s: compared anyway (--allow-size-mismatch), each resized by the extractor", what)
    return [scan.count for scan in scans]


def sets(args: argparse.Namespace) -> dict[str, Any]:
    """FID / KID / IS (Inception), FD-DINOv2 (DINOv2 ViT-L/14) and precision / recall (VGG-16 fc2) of two
    image sets, with torch-fidelity's key names, except ``fd_dinov2`` (EDM2's: torch-fidelity names every
    Fréchet distance ``frechet_inception_distance``, whatever the extractor). IS is of INPUT1, precision
    the share of INPUT1 inside INPUT2's manifold, as there. Every image's size is checked
    (``_set_sizes``), then every weights file, before any image is read."""
    from diffusionflow.metrics.kid_is import inception_score, kernel_inception_distance
    from diffusionflow.metrics.prc import precision_recall

    on_inception = args.fid or args.kid or args.isc
    if not (on_inception or args.fd_dinov2 or args.prc):
        raise CommandError("choose at least one metric: --fid, --kid, --isc, --fd-dinov2 or --prc")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--kid-subsets", args.kid_subsets),
        ("--isc-splits", args.isc_splits),
        ("--prc-neighborhood", args.prc_neighborhood),
    ):
        if value < 1:
            raise CommandError(f"{flag} {value} must be >= 1")
    counts = _set_sizes(args)
    if args.kid and not 2 <= args.kid_subset_size <= min(counts):
        raise CommandError(
            f"--kid-subset-size {args.kid_subset_size} must be in [2, {min(counts)}] (the smaller set's size)"
        )
    if args.isc and counts[0] < args.isc_splits:
        raise CommandError(f"--isc-splits {args.isc_splits} exceeds the {counts[0]} images of {args.input1}")
    if args.prc and args.prc_neighborhood >= min(counts):
        raise CommandError(
            f"--prc-neighborhood {args.prc_neighborhood} must be < {min(counts)} (the smaller set's size)"
        )
    device = _device(args.device)
    try:
        files = {"fd_dinov2": DinoV2.weights_of(args.dinov2_model), "prc": EXTRACTORS["prc"].weights_file}
    except ValueError as err:
        raise CommandError(f"--dinov2-model {args.dinov2_model}: {err}") from err
    weights = {"fd_dinov2": args.dinov2_weights, "prc": args.vgg16_weights}
    paths = {m: files[m].resolve(weights[m]) for m in weights if getattr(args, m)}
    inception = _inception(args.inception_weights, device) if on_inception else None
    out: dict[str, Any] = {}
    try:  # a file whose header read but whose pixels do not, a weights file of another network: named
        if inception is not None:
            if args.fid or args.kid:
                _warn_if_singular(min(counts), inception)
            first = _features(inception, args.input1, args.batch_size)
            second = _features(inception, args.input2, args.batch_size) if args.fid or args.kid else None
        for metric, path in paths.items():
            options = {"name": args.dinov2_model} if metric == "fd_dinov2" else {}
            net = build_extractor(metric, path, device, **options)
            if metric == "fd_dinov2":
                _warn_if_singular(min(counts), net)
            features = [_features(net, source, args.batch_size)[0] for source in (args.input1, args.input2)]
            if metric == "fd_dinov2":
                out[net.metric_name] = _frechet(features)
            else:
                out |= precision_recall(*features, k=args.prc_neighborhood)
            out[f"extractor_{metric}"] = net.name
    except ValueError as err:
        raise CommandError(str(err)) from err
    if args.isc:
        mean, std = inception_score(first[1], splits=args.isc_splits)
        out |= {"inception_score_mean": mean, "inception_score_std": std}
    if args.fid:
        out["frechet_inception_distance"] = _frechet([first[0], second[0]])
    if args.kid:
        mean, std = kernel_inception_distance(
            first[0], second[0], subsets=args.kid_subsets, subset_size=args.kid_subset_size
        )
        out |= {"kernel_inception_distance_mean": mean, "kernel_inception_distance_std": std}
    out |= {"num_samples_input1": counts[0], "num_samples_input2": counts[1]}
    if inception is not None:
        out["extractor"] = inception.name
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return out


# ---- prefetch ----------------------------------------------------------------------------------------
def prefetch(args: argparse.Namespace) -> list[Path]:
    """Downloads the weights named by ``--what`` (the only networked command), each unless already
    there, and prints where each went."""
    what = [w.strip() for w in args.what.split(",")]
    if not what or any(w not in PREFETCH_FILES for w in what) or len(set(what)) != len(what):
        raise CommandError(f"--what {args.what}: allowed a comma-separated list from {list(PREFETCH_FILES)}")
    dest = Path(args.dest).expanduser() if args.dest else None
    if dest is not None and len(what) > 1:
        if dest.is_file():
            raise CommandError(f"--dest {dest} is a file: --what {args.what} names several, give a folder")
        dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for weights in (PREFETCH_FILES[w] for w in what):
        try:
            paths.append(weights.prefetch(dest))
        except OSError as err:  # no network: URLError
            raise CommandError(
                f"could not download the {weights.what} weights from {weights.url}: {err}"
            ) from err
        print(paths[-1])
    return paths


# ---- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusionflow.evaluate",
        description="Evaluate checkpoints (samplers, nll) and image sets (sets).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "samplers",
        help="checkpoints × weights × samplers × guidance → grid.csv, fid_vs_nfe.png (torchrun: split seeds)",
    )
    g.add_argument(
        "--ckpt",
        required=True,
        help="a checkpoint of diffusionflow.train, a folder of them or a quoted glob (one run's snapshots)",
    )
    g.add_argument("--samplers", required=True, help="name:steps,... e.g. heun:18,ddim:10,ddim:20")
    g.add_argument("--num-samples", type=int, default=10_000)
    g.add_argument("--metric", choices=METRICS, required=True)
    g.add_argument(
        "--weights",
        help=f"comma-separated, from {','.join(WEIGHTS)} (default ema; none with --ema-sigma-rel)",
    )
    g.add_argument(
        "--ema-sigma-rel", help="post-hoc EMA widths σ_rel, e.g. 0.05,0.1,0.15 (weights sigma_rel:<x>)"
    )
    g.add_argument(
        "--guidance", help="classifier-free guidance scales, e.g. 1,1.5,2 (class-conditional checkpoints)"
    )
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument(
        "--reference", default="train", help="train | val | an .npz with mu, sigma (default train)"
    )
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--seed-offset", type=int, default=0, help="sample i uses seed seed_offset + i")
    g.add_argument("--inception-weights", help="Inception weights file (default: the torch.hub cache)")
    g.add_argument("--cache-dir", default=str(default_cache_dir()), help="reference statistics cache")
    g.add_argument(
        "--device",
        help="default: cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK",
    )
    g.set_defaults(func=samplers)

    n = sub.add_parser("nll", help="NLL of data points by the probability-flow ODE and the ELBO → nll.json")
    n.add_argument("--ckpt", required=True, help="a checkpoint of diffusionflow.train")
    n.add_argument("--weights", choices=WEIGHTS, default="ema")
    n.add_argument("--method", default="ode,elbo", help=f"comma-separated, from {','.join(METHODS)}")
    n.add_argument("--num-samples", type=int, default=1000, help="data points (a seeded random subset)")
    n.add_argument("--split", choices=("train", "val"), default="train")
    n.add_argument("--steps", type=int, default=64, help="RK4 steps of the ODE (4 denoiser calls each)")
    n.add_argument("--points", type=int, default=64, help="Gauss–Legendre nodes in λ of the ELBO")
    n.add_argument("--probes", type=int, default=1, help="Hutchinson probes per point (images)")
    n.add_argument("--batch-size", type=int, default=256)
    n.add_argument("--seed", type=int, default=0, help="data subset, dequantisation, probes and ELBO noise")
    n.add_argument("--out", help="output folder for nll.json (default: <run>/eval beside checkpoints/)")
    n.add_argument("--device", help="default: cuda when available, else cpu")
    n.set_defaults(func=nll)

    c = sub.add_parser(
        "sets", help="FID / KID / IS / FD-DINOv2 / precision-recall of two image sets (torch-fidelity's CLI)"
    )
    c.add_argument("input1", help="a folder of PNGs or a uint8 NHWC .npz")
    c.add_argument("input2", help="a folder of PNGs or a uint8 NHWC .npz")
    c.add_argument("--fid", action="store_true", help="Fréchet Inception distance")
    c.add_argument("--kid", action="store_true", help="kernel Inception distance")
    c.add_argument("--isc", action="store_true", help="Inception score of input1")
    c.add_argument(
        "--fd-dinov2", action="store_true", help="Fréchet distance of DINOv2 ViT-L/14 features (EDM2's)"
    )
    c.add_argument(
        "--prc", action="store_true", help="precision / recall of input1 against input2 (VGG-16 fc2)"
    )
    c.add_argument("--kid-subsets", type=int, default=100)
    c.add_argument("--kid-subset-size", type=int, default=1000)
    c.add_argument("--isc-splits", type=int, default=10)
    c.add_argument("--prc-neighborhood", type=int, default=3, help="k of the k-th-neighbour radii")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument(
        "--allow-size-mismatch",
        action="store_true",
        help="compare sets of different image sizes (each resized by the extractor), with a warning",
    )
    c.add_argument("--inception-weights", help="Inception weights file (default: the torch.hub cache)")
    c.add_argument(
        "--dinov2-model",
        default=DinoV2.name,
        help=f"torch-fidelity's DINOv2 extractor for --fd-dinov2 (default {DinoV2.name}, EDM2's FD-DINOv2; "
        "another is reported as fd_<model>)",
    )
    c.add_argument("--dinov2-weights", help="DINOv2 weights file (default: the torch.hub cache)")
    c.add_argument("--vgg16-weights", help="torchvision VGG-16 weights file (default: the torch.hub cache)")
    c.add_argument("--device", help="default: cuda when available, else cpu")
    c.add_argument("--json", help="also write the result to this file")
    c.set_defaults(func=sets)

    p = sub.add_parser("prefetch", help="download pretrained weights (needs internet)")
    p.add_argument(
        "--what",
        default="inception",
        help=f"comma-separated, from {','.join(PREFETCH_FILES)} (default inception)",
    )
    p.add_argument(
        "--dest", help=f"a folder, or a file for one --what (default: {default_weights_path().parent})"
    )
    p.set_defaults(func=prefetch)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """Runs a subcommand; bad input ends with ``error: ...`` and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, ConfigError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")


def cli() -> None:
    """The ``df-evaluate`` console script: ``main`` on ``sys.argv``, exit status 0 on success (``main``
    returns the subcommand's result, which ``sys.exit`` would print and turn into status 1)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
