"""Evaluate checkpoints and image sets: ``python -m diffusionflow.evaluate {samplers,nll,sets,prefetch}``.

    python -m diffusionflow.evaluate samplers --ckpt logs/train/runs/<run>/checkpoints/last.ckpt \\
        --samplers heun:18,ddim:10,ddim:20 --num-samples 50000 --metric fid --out logs/eval/<run>
    python -m diffusionflow.evaluate nll --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --method ode,elbo
    python -m diffusionflow.evaluate sets samples.npz cifar10-train/ --fid --kid --isc --json out.json
    python -m diffusionflow.evaluate prefetch [--dest DIR]

``samplers`` measures one checkpoint with several samplers × step counts: the same per-sample seeds
(``diffusionflow.metrics.generate``) and reference statistics as training's ``FIDCallback`` (so a row and
the callback's value at that checkpoint agree), written to ``grid.csv`` and plotted against NFE in
``fid_vs_nfe.png``. ``--metric`` is ``fid`` (Inception), ``fd_digits`` (the digits classifier) or
``toy`` (sliced W2, energy distance and exact log-density on 2-D data). ``nll`` estimates the negative
log-likelihood of points of the run's own data set through the probability-flow ODE and the ELBO
(``diffusionflow.nll``), in nats and bits/dim, written to ``nll.json``. ``sets`` is
torch-fidelity's command line on two image sets (a PNG folder or a uint8 NHWC ``.npz``), with its JSON
key names. ``prefetch`` is the only command that uses the network: it downloads the Inception weights,
which nothing else ever does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf

from diffusionflow.checkpoint import WEIGHTS, load_module
from diffusionflow.checks import check_device
from diffusionflow.config import instantiate_checked
from diffusionflow.errors import ConfigError
from diffusionflow.metrics.digits_classifier import DigitsClassifier, default_cache_dir
from diffusionflow.metrics.extractors import WEIGHTS_FILENAME, InceptionV3, default_weights_path
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
from diffusionflow.metrics.generate import generate, nfe_of, parse_samplers
from diffusionflow.metrics.toy_samples import toy_metrics
from diffusionflow.nll import METHODS, data_points, exact_nll, nll_estimates, prepare, summary

__all__ = ["build_parser", "main", "nll", "prefetch", "samplers", "sets"]

log = logging.getLogger(__name__)

METRICS = ("fid", "fd_digits", "toy")
PREFETCH = "python -m diffusionflow.evaluate prefetch"
SAMPLERS_CSV, SAMPLERS_PNG, NLL_JSON = "grid.csv", "fid_vs_nfe.png", "nll.json"
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
def _toy_rows(
    module: Any, sampler: Any, nfe: int, datamodule: Any, args: argparse.Namespace
) -> list[EvalRow]:
    """Sliced W2, energy distance (and their floors) and exact log-densities of 2-D samples."""
    samples = generate(
        module,
        range(args.num_samples),
        shape=datamodule.shape,
        batch_size=args.batch_size,
        seed_offset=args.seed_offset,
        sampler=sampler,
    )
    dataset = datamodule.train_set
    reference = json.dumps(
        {
            "dataset": describe_dataset(datamodule.train_factory, dataset),
            "reference_seeds": [args.seed_offset + 1, args.seed_offset + 2],
        }
    )
    return [
        _row(name, value, sampler, nfe, args, reference)
        for name, value in toy_metrics(samples, dataset, args.num_samples, args.seed_offset).items()
    ]


def _row(
    metric: str, value: float, sampler: Any, nfe: int, args: argparse.Namespace, reference: str
) -> EvalRow:
    return EvalRow(
        key=metric_key(metric, args.num_samples, sampler.name, nfe, args.weights),
        metric=metric,
        value=value,
        num_samples=args.num_samples,
        sampler=sampler.name,
        steps=sampler.steps,
        nfe=nfe,
        seeds=f"{args.seed_offset}-{args.seed_offset + args.num_samples - 1}",
        weights=args.weights,
        reference=reference,
        sampler_config=repr(sampler),
    )


def _plot(rows: Sequence[EvalRow], path: Path) -> None:
    """Metric vs NFE (log x), one line per sampler, one panel per metric (a ``*_floor`` metric is drawn
    as a dashed line in its metric's panel)."""
    metrics = [m for m in dict.fromkeys(r.metric for r in rows) if not m.endswith(("_floor", "_data"))]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for sampler in dict.fromkeys(r.sampler for r in rows):
            points = sorted((r.nfe, r.value) for r in rows if r.metric == metric and r.sampler == sampler)
            ax.plot(*zip(*points, strict=True), marker="o", label=sampler)
        floors = [r.value for r in rows if r.metric in (f"{metric}_floor", f"{metric}_data")]
        if floors:
            ax.axhline(sum(floors) / len(floors), color="grey", linestyle="--", label="reference level")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}, {rows[0].num_samples} samples, {rows[0].weights} weights")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samplers(args: argparse.Namespace) -> list[EvalRow]:
    """Every sampler of ``--samplers`` on the checkpoint; writes ``grid.csv`` and ``fid_vs_nfe.png``."""
    if args.num_samples < 2 or args.batch_size < 1 or args.seed_offset < 0:
        raise CommandError(
            f"--num-samples {args.num_samples} must be >= 2, --batch-size {args.batch_size} >= 1 and "
            f"--seed-offset {args.seed_offset} >= 0"
        )
    try:
        measured = parse_samplers(args.samplers.split(","))
    except ValueError as err:
        raise CommandError(f"--samplers {args.samplers}: {err}") from err
    if args.reference not in REFERENCE_SPLITS and not Path(args.reference).is_file():
        raise CommandError(f"--reference {args.reference}: neither train, val nor an .npz file")
    device = _device(args.device)
    inception = _inception(args.inception_weights, device) if args.metric == "fid" else None
    module = load_module(args.ckpt, args.weights, map_location=device)
    cfg = OmegaConf.create(module.hparams["config"])
    datamodule = instantiate_checked(cfg.data, "data")
    shape = list(datamodule.shape)
    fits = {"toy": len(shape) == 1, "fid": len(shape) == 3, "fd_digits": shape[:1] == [1] and len(shape) == 3}
    if not fits[args.metric]:
        raise CommandError(
            f"--metric {args.metric} does not fit data of shape {shape} ({cfg.data.train_dataset._target_}); "
            f"allowed: {[m for m, ok in fits.items() if ok]}"
        )
    datamodule.setup("fit")
    rows = []
    if args.metric == "toy":
        for sampler in measured:
            rows += _toy_rows(module, sampler, nfe_of(sampler, module.schedule), datamodule, args)
    else:
        cache = Path(args.cache_dir)
        extractor = DigitsClassifier(cache).to(device) if inception is None else inception
        mu, sigma, reference = reference_moments(
            args.reference, datamodule, extractor, cache, args.batch_size
        )
        metric = metric_name_of(extractor)
        for sampler in measured:
            nfe = nfe_of(sampler, module.schedule)
            gen = generate_features(
                module,
                sampler,
                range(args.num_samples),
                extractor,
                shape=datamodule.shape,
                batch_size=args.batch_size,
                seed_offset=args.seed_offset,
                progress=True,
                desc=metric_key(metric, args.num_samples, sampler.name, nfe, args.weights),
            )
            value = frechet_distance(*gen.stats.mean_cov(), mu, sigma)
            rows.append(_row(metric, value, sampler, nfe, args, reference))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SAMPLERS_CSV).unlink(missing_ok=True)
    append_rows(out / SAMPLERS_CSV, rows, checkpoint=str(args.ckpt))
    _plot(rows, out / SAMPLERS_PNG)
    for row in rows:
        print(f"{row.key}\t{row.value:.6g}")
    print(f"wrote {out / SAMPLERS_CSV} and {out / SAMPLERS_PNG}")
    return rows


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
def _features(net: InceptionV3, source: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of every image of a PNG folder or ``.npz``."""
    from diffusionflow.metrics.images import image_batches

    pairs = [net.features_and_logits(batch) for batch in image_batches(source, batch_size)]
    return torch.cat([f.cpu() for f, _ in pairs]), torch.cat([lg.cpu() for _, lg in pairs])


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

    both = args.fid or args.kid
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
    """FID / KID / IS of two image sets, torch-fidelity's key names; IS is of INPUT1, as there. Every
    image's size is checked before any feature is extracted (``_set_sizes``)."""
    from diffusionflow.metrics.kid_is import inception_score, kernel_inception_distance

    if not (args.fid or args.kid or args.isc):
        raise CommandError("choose at least one metric: --fid, --kid or --isc")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--kid-subsets", args.kid_subsets),
        ("--isc-splits", args.isc_splits),
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
    net = _inception(args.inception_weights, _device(args.device))
    if (args.fid or args.kid) and min(counts) < net.feature_dim:
        log.warning(
            "%d images < %d features: the covariance is singular and FID is biased upward; "
            "papers use 50k samples",
            min(counts),
            net.feature_dim,
        )
    try:
        first = _features(net, args.input1, args.batch_size)
        second = _features(net, args.input2, args.batch_size) if args.fid or args.kid else None
    except ValueError as err:  # a file whose header read but whose pixels do not: named
        raise CommandError(str(err)) from err
    out: dict[str, Any] = {}
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
    out |= {"num_samples_input1": counts[0], "num_samples_input2": counts[1], "extractor": net.name}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return out


# ---- prefetch ----------------------------------------------------------------------------------------
def prefetch(args: argparse.Namespace) -> Path:
    """Downloads the Inception weights (the only networked command) and prints where they went."""
    from diffusionflow.metrics.extractors import prefetch_inception

    try:
        path = prefetch_inception(Path(args.dest) if args.dest else None)
    except OSError as err:  # no network: URLError
        raise CommandError(f"could not download the Inception weights: {err}") from err
    print(path)
    return path


# ---- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusionflow.evaluate",
        description="Evaluate checkpoints (samplers, nll) and image sets (sets).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("samplers", help="one checkpoint × samplers × steps → grid.csv, fid_vs_nfe.png")
    g.add_argument("--ckpt", required=True, help="a checkpoint of diffusionflow.train")
    g.add_argument("--samplers", required=True, help="name:steps,... e.g. heun:18,ddim:10,ddim:20")
    g.add_argument("--num-samples", type=int, default=10_000)
    g.add_argument("--metric", choices=METRICS, required=True)
    g.add_argument("--weights", choices=WEIGHTS, default="ema")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument(
        "--reference", default="train", help="train | val | an .npz with mu, sigma (default train)"
    )
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--seed-offset", type=int, default=0, help="sample i uses seed seed_offset + i")
    g.add_argument("--inception-weights", help="Inception weights file (default: the torch.hub cache)")
    g.add_argument("--cache-dir", default=str(default_cache_dir()), help="reference statistics cache")
    g.add_argument("--device", help="default: cuda when available, else cpu")
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

    c = sub.add_parser("sets", help="FID / KID / IS of two image sets (torch-fidelity's CLI)")
    c.add_argument("input1", help="a folder of PNGs or a uint8 NHWC .npz")
    c.add_argument("input2", help="a folder of PNGs or a uint8 NHWC .npz")
    c.add_argument("--fid", action="store_true", help="Fréchet Inception distance")
    c.add_argument("--kid", action="store_true", help="kernel Inception distance")
    c.add_argument("--isc", action="store_true", help="Inception score of input1")
    c.add_argument("--kid-subsets", type=int, default=100)
    c.add_argument("--kid-subset-size", type=int, default=1000)
    c.add_argument("--isc-splits", type=int, default=10)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument(
        "--allow-size-mismatch",
        action="store_true",
        help="compare sets of different image sizes (each resized by the extractor), with a warning",
    )
    c.add_argument("--inception-weights", help="Inception weights file (default: the torch.hub cache)")
    c.add_argument("--device", help="default: cuda when available, else cpu")
    c.add_argument("--json", help="also write the result to this file")
    c.set_defaults(func=sets)

    p = sub.add_parser("prefetch", help="download the Inception weights (needs internet)")
    p.add_argument("--dest", help=f"a folder or file (default: {default_weights_path().parent})")
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
