"""FID of N generated images against cached reference statistics: ours against torch-fidelity.

    python scripts/bench_fid.py [--quick] [--n 256 512 1024] [--ref 512] [--repeats 1] [--weights PATH]

Both sides start from the same PNG folders and the same Inception weights file (a random-init one
written here, since the real weights cannot be downloaded offline; the cost does not depend on the
values). The reference statistics are cached before timing, on each side its own way:

* ours: :func:`~diffusionflow.metrics.reference.reference_stats` (``.npz`` of μ, Σ, n), then the N
  images are streamed in batches through :class:`~diffusionflow.metrics.InceptionV3` into a
  float64 :class:`~diffusionflow.metrics.FrechetStats` (Σf, Σffᵀ; memory independent of N) and
  :func:`~diffusionflow.metrics.frechet_distance` (Heusel et al. 2017);
* torch-fidelity: ``calculate_metrics`` cannot take precomputed (μ, Σ) as an input, but its own
  cache serves them: ``input2_cache_name`` + ``cache_root`` store the reference statistics once, and
  the timed call only extracts input1 (the N images), keeping all N feature vectors in memory before
  ``np.cov``. DataLoader workers are off (``save_cpu_ram=True``), as our reader is in-process.

Each (side, N) runs in a fresh subprocess, in ``--repeats`` interleaved rounds (the two sides
alternate going first), so its peak RSS (``ru_maxrss``) is its own. The time covers building the
extractor, loading the reference statistics, reading and extracting the N images and the Fréchet
distance, split into stages (torch-fidelity's by timing its own functions in place):

* build: the Inception module with its weights; reference: the cached statistics read back
  (torch-fidelity's cache look-up is in "other");
* decode: PNG → uint8 tensor (PIL; ours in-process, torch-fidelity's DataLoader without workers);
* features: the Inception forward (uint8 → float, TF1-compatible bilinear resize to 299², the net);
* stats: (μ, Σ) (ours float64 running sums, torch-fidelity ``np.cov`` of the kept features);
* frechet: the distance, whose cost is Tr (Σ₁Σ₂)^{1/2} (ours a pivoted Cholesky factor and a
  k × k ``eigvalsh``, torch-fidelity ``eigvals`` of the 2048² product); other: the rest.

Ratios are medians over rounds of the per-round ratio ours/theirs; the stage seconds shown are each
side's fastest round. Features are bit for bit the same on both sides (the tests check it). (Δ) is
peak RSS minus RSS after the imports; both peaks are set by the Inception forward on one batch
(activations at 299 × 299), the same module on both sides; torch-fidelity's feature matrix (8 KB per
image, plus np.cov's float64 copy) only shows at tens of thousands of images.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusionflow.metrics import (
    FrechetStats,
    InceptionV3,
    frechet_distance,
    image_batches,
    reference_stats,
    save_png_folder,
    synthetic_images,
)
from diffusionflow.metrics.extractors import save_random_inception_weights

NS = (256, 512, 1024)
QUICK_NS = (64, 128)
REF, QUICK_REF = 512, 128
BATCH = 64
REF_KEY = {"dataset": "bench-synthetic", "split": "ref", "resolution": 32}
FIDELITY_REF_NAME = "bench-fid-ref"
STAGES = ("build", "reference", "decode", "features", "stats", "frechet")


def rss_mb() -> float:
    """Current resident set size (Linux ``/proc/self/status``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Seconds per stage: ``timed(stage, fn)`` is ``fn`` with its calls' time counted under ``stage``;
    time spent in a timed call nested inside another counts only under the inner one's stage."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._open: list[str] = []

    def timed(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._open.append(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                self._open.pop()
                took = time.perf_counter() - start
                self.seconds[stage] += took
                if self._open:
                    self.seconds[self._open[-1]] -= took

        return wrapper


def fidelity_kwargs(args: argparse.Namespace) -> dict:
    """torch-fidelity settings shared by the cache warm-up and the timed runs."""
    return {
        "input2": str(args.workdir / "ref"),
        "input2_cache_name": FIDELITY_REF_NAME,
        "cache_root": str(args.workdir / "fidelity_cache"),
        "cache": True,
        "fid": True,
        "cuda": False,
        "batch_size": args.batch_size,
        "feature_extractor_weights_path": str(args.weights),
        "save_cpu_ram": True,
        "verbose": False,
    }


def reference_ours(args: argparse.Namespace, net: InceptionV3) -> FrechetStats:
    ref_images = functools.partial(image_batches, args.workdir / "ref", args.batch_size)
    return reference_stats(ref_images, net, {**REF_KEY, "count": args.ref}, args.workdir / "ref_cache")


def fid_ours(args: argparse.Namespace, generated: Path, stages: Stages) -> float:
    net = stages.timed("build", InceptionV3)(args.weights)
    ref = stages.timed("reference", reference_ours)(args, net)
    stats = FrechetStats(net.feature_dim)
    extract, update = stages.timed("features", net), stages.timed("stats", stats.update)
    read = stages.timed("decode", next)
    batches = image_batches(generated, args.batch_size)
    while (batch := read(batches, None)) is not None:
        update(extract(batch))
    moments = stages.timed("stats", stats.mean_cov)()
    return stages.timed("frechet", frechet_distance)(*moments, *ref.mean_cov())


def fid_theirs(args: argparse.Namespace, generated: Path, stages: Stages) -> float:
    """torch-fidelity's ``calculate_metrics``, its stages timed by wrapping, where they are looked up,
    the functions its FID-only path (``fid_inputs_to_metric``) calls."""
    import torch_fidelity
    from torch_fidelity import datasets, metric_fid, metrics, utils

    wrap = {
        (metrics, "create_feature_extractor"): "build",
        (datasets.ImagesPathDataset, "__getitem__"): "decode",
        (utils, "get_featuresdict_from_dataset"): "features",
        (metric_fid, "fid_features_to_statistics"): "stats",
        (metric_fid, "fid_statistics_to_metric"): "frechet",
    }
    for (owner, name), stage in wrap.items():
        setattr(owner, name, stages.timed(stage, getattr(owner, name)))
    result = torch_fidelity.calculate_metrics(input1=str(generated), **fidelity_kwargs(args))
    return result["frechet_inception_distance"]


def worker(args: argparse.Namespace) -> None:
    """One timed run in this (fresh) process; prints a JSON line."""
    import torch_fidelity  # noqa: F401  (imported by both sides before the clock starts)

    stages = Stages()
    fid_fn = {"ours": fid_ours, "theirs": fid_theirs}[args.worker]
    base = rss_mb()
    start = time.perf_counter()
    fid = fid_fn(args, args.generated, stages)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    result = {"seconds": seconds, **stages.seconds, "other": seconds - sum(stages.seconds.values())}
    print(json.dumps({**result, "fid": fid, "peak_mb": peak, "delta_mb": peak - base}))


def run_worker(args: argparse.Namespace, side: str, generated: Path) -> dict:
    """One run in a fresh process."""
    cmd = [sys.executable, __file__, "--worker", side, "--generated", str(generated)]
    cmd += ["--workdir", str(args.workdir), "--weights", str(args.weights)]
    cmd += ["--ref", str(args.ref), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def prepare(args: argparse.Namespace) -> dict[int, Path]:
    """Weights, the reference and generated PNG folders, both sides' reference caches."""
    if args.weights is None:
        args.weights = save_random_inception_weights(args.workdir / "random-inception.pth")
    save_png_folder(synthetic_images(args.ref, seed=0, cells=4), args.workdir / "ref")
    generated = {}
    for n in args.n:
        generated[n] = args.workdir / f"gen{n}"
        save_png_folder(synthetic_images(n, seed=n, cells=6, tint=0.2), generated[n])
    print(f"caching reference statistics of {args.ref} images (ours, then torch-fidelity's)", flush=True)
    reference_ours(args, InceptionV3(args.weights))
    import torch_fidelity

    ref = {"input1": str(args.workdir / "ref"), "input1_cache_name": FIDELITY_REF_NAME}
    torch_fidelity.calculate_metrics(**ref, **fidelity_kwargs(args))
    return generated


Rounds = list[tuple[dict, dict]]
"""One (ours, theirs) pair of worker results per round."""


def ratio(rounds: Rounds, of: Callable[[dict], float]) -> float:
    """Median over rounds of ours/theirs of ``of(result)`` (nan where theirs is 0)."""
    return float(np.median([of(o) / of(t) if of(t) > 0 else np.nan for o, t in rounds]))


def tables(results: dict[int, Rounds]) -> str:
    """Per N the stages side by side (each side's fastest round, the median per-round ratio), then a
    summary row per N."""
    lines = []
    for n, rounds in results.items():
        ours, theirs = (min((r[i] for r in rounds), key=lambda r: r["seconds"]) for i in (0, 1))
        lines += [f"N = {n}, {len(rounds)} round(s)", "| stage | ours s | theirs s | ours/theirs |"]
        lines.append("|---|---:|---:|---:|")
        for key in (*STAGES, "other", "seconds"):
            name = "**total**" if key == "seconds" else key
            share = ratio(rounds, lambda r, key=key: r[key])
            shown = "–" if np.isnan(share) else f"{share:.2f}"  # torch-fidelity's reference: in other
            lines.append(f"| {name} | {ours[key]:.2f} | {theirs[key]:.2f} | {shown} |")
        lines.append("")
    head = (
        "| N | time ours/theirs | features | all but frechet | ours peak MB (Δ) | theirs peak MB (Δ) "
        "| FID ours | FID theirs | rel. diff |"
    )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for n, rounds in results.items():
        o, t = rounds[-1]
        total, features = ratio(rounds, lambda r: r["seconds"]), ratio(rounds, lambda r: r["features"])
        rest = ratio(rounds, lambda r: r["seconds"] - r["frechet"])
        lines.append(
            f"| {n} | {total:.2f} | {features:.2f} | {rest:.2f} "
            f"| {o['peak_mb']:.0f} ({o['delta_mb']:.0f}) | {t['peak_mb']:.0f} ({t['delta_mb']:.0f}) "
            f"| {o['fid']:.6g} | {t['fid']:.6g} | {abs(o['fid'] - t['fid']) / abs(t['fid']):.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"N in {QUICK_NS}, {QUICK_REF} reference images")
    parser.add_argument("--n", type=int, nargs="+", help=f"numbers of generated images (default {NS})")
    parser.add_argument("--ref", type=int, help=f"reference images (default {REF})")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of (ours, theirs) per N")
    parser.add_argument(
        "--workdir", type=Path, help="where images, weights and caches go (default: a temp dir)"
    )
    parser.add_argument("--weights", type=Path, help="Inception weights (default: random-init, written here)")
    parser.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    parser.add_argument("--generated", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.n = args.n or (QUICK_NS if args.quick else NS)
    args.ref = args.ref or (QUICK_REF if args.quick else REF)
    if args.worker:
        worker(args)
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or Path(tmp)
        generated = prepare(args)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}",
            flush=True,
        )
        results: dict[int, Rounds] = {n: [] for n in args.n}
        for r in range(args.repeats):
            for i, n in enumerate(args.n):
                sides = ("ours", "theirs")[:: 1 if (i + r) % 2 == 0 else -1]  # alternate who runs first
                runs = {side: run_worker(args, side, generated[n]) for side in sides}
                results[n].append((runs["ours"], runs["theirs"]))
                print(f"round {r + 1}, N = {n} done", flush=True)
    result = tables(results)
    print(result)
    return result


if __name__ == "__main__":
    main()
