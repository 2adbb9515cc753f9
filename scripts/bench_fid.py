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

Each (side, N) runs in a fresh subprocess (the two sides alternate going first), so its peak RSS
(``ru_maxrss``) is its own; the time covers building the extractor, loading the reference
statistics, reading and extracting the N images and the Fréchet distance. (Δ) is peak RSS minus
RSS after the imports. At these N both peaks are set by the Inception forward pass on one
batch (activations at 299 × 299), the same module on both sides; torch-fidelity's feature matrix
(8 KB per image, plus np.cov's float64 copy) only shows at tens of thousands of images.
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
from collections.abc import Sequence
from pathlib import Path

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


def rss_mb() -> float:
    """Current resident set size (Linux ``/proc/self/status``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def fid_ours(args: argparse.Namespace, generated: Path) -> float:
    net = InceptionV3(args.weights)
    ref = reference_ours(args, net)
    stats = FrechetStats(net.feature_dim)
    for batch in image_batches(generated, args.batch_size):
        stats.update(net(batch))
    return frechet_distance(*stats.mean_cov(), *ref.mean_cov())


def fid_theirs(args: argparse.Namespace, generated: Path) -> float:
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(input1=str(generated), **fidelity_kwargs(args))
    return metrics["frechet_inception_distance"]


def worker(args: argparse.Namespace) -> None:
    """One timed run in this (fresh) process; prints a JSON line. ``np.linalg.eigvals`` (the
    Tr √(Σ₁Σ₂) of both sides' Fréchet distance, same call on a 2048² product) is timed apart: on a
    busy CPU its time varies by several × from run to run."""
    import torch_fidelity  # noqa: F401  (imported by both sides before the clock starts)

    eig_seconds = 0.0
    eigvals = np.linalg.eigvals

    def timed_eigvals(a: np.ndarray) -> np.ndarray:
        nonlocal eig_seconds
        start = time.perf_counter()
        try:
            return eigvals(a)
        finally:
            eig_seconds += time.perf_counter() - start

    np.linalg.eigvals = timed_eigvals
    fid_fn = {"ours": fid_ours, "theirs": fid_theirs}[args.worker]
    base = rss_mb()
    start = time.perf_counter()
    fid = fid_fn(args, args.generated)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    result = {"seconds": seconds, "eig": eig_seconds, "fid": fid, "peak_mb": peak, "delta_mb": peak - base}
    print(json.dumps(result))


def run_worker(args: argparse.Namespace, side: str, generated: Path) -> dict:
    """The fastest of ``args.repeats`` fresh-process runs."""
    cmd = [sys.executable, __file__, "--worker", side, "--generated", str(generated)]
    cmd += ["--workdir", str(args.workdir), "--weights", str(args.weights)]
    cmd += ["--ref", str(args.ref), "--batch-size", str(args.batch_size)]
    runs = [
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout for _ in range(args.repeats)
    ]
    return min((json.loads(out.strip().splitlines()[-1]) for out in runs), key=lambda r: r["seconds"])


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


def table(rows: list[tuple[int, dict, dict]]) -> str:
    head = (
        "| N | ours s (eigvals) | theirs s (eigvals) | time ours/theirs | same, without eigvals "
        "| ours peak MB (Δ) | theirs peak MB (Δ) | peak ours/theirs | FID ours | FID theirs | rel. diff |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n, o, t in rows:
        rest = (o["seconds"] - o["eig"]) / (t["seconds"] - t["eig"])
        lines.append(
            f"| {n} | {o['seconds']:.1f} ({o['eig']:.1f}) | {t['seconds']:.1f} ({t['eig']:.1f}) "
            f"| {o['seconds'] / t['seconds']:.2f} | {rest:.2f} "
            f"| {o['peak_mb']:.0f} ({o['delta_mb']:.0f}) | {t['peak_mb']:.0f} ({t['delta_mb']:.0f}) "
            f"| {o['peak_mb'] / t['peak_mb']:.2f} | {o['fid']:.6g} | {t['fid']:.6g} "
            f"| {abs(o['fid'] - t['fid']) / abs(t['fid']):.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"N in {QUICK_NS}, {QUICK_REF} reference images")
    parser.add_argument("--n", type=int, nargs="+", help=f"numbers of generated images (default {NS})")
    parser.add_argument("--ref", type=int, help=f"reference images (default {REF})")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=1, help="runs per (side, N); the fastest is shown")
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
        rows = []
        for i, n in enumerate(args.n):
            sides = ("ours", "theirs")[:: 1 if i % 2 == 0 else -1]  # alternate who runs first
            runs = {side: run_worker(args, side, generated[n]) for side in sides}
            rows.append((n, runs["ours"], runs["theirs"]))
            print(f"N = {n} done", flush=True)
    result = table(rows)
    print(result)
    return result


if __name__ == "__main__":
    main()
