"""Compare the jobs of a sweep: ``df-compare <multirun folder> [--out DIR] [--wandb]`` (or ``python -m
diffusionflow.compare``).

One row per configuration (the job's command-line overrides, seeds left out) with each final metric as
mean ± standard deviation over its seeds (sample std, ddof = 1) and the number of seeds. A job's outcome
is the newest of its ``metrics.json`` (done), ``error.log`` (failed) and ``interrupted`` marker, so a
job re-run in its folder counts as its last attempt ended; failed, interrupted, unfinished (none of
them yet) and unreadable jobs are counted apart, never averaged. A file that cannot be read
(``metrics.json``, ``.hydra/*.yaml``, a CSV) is named in a warning and below the table, and the table
is built from the rest. Written to ``<out>/``:

* ``comparison.md`` and ``comparison.csv`` (the table; the Markdown is also printed), ``runs.csv``
  (every job's final metrics);
* ``metric_vs_step.png`` (metrics logged during training: mean ± std over seeds per configuration),
  ``metric_vs_nfe.png`` (final metrics against the sampler's NFE, one line per sampler; drawn when a
  sampler has two or more NFEs: a sampler × steps sweep, ``evaluate grid`` files, several samplers in
  the FID callback), ``loss_vs_logsnr.png`` (the last epoch's ε-MSE and weighted loss per λ bin) and
  ``weighting.png`` (each configuration's w(λ), normalised to max 1, and the proposal p(λ) it trained
  with: an adaptive proposal is read back from the job's last checkpoint).

A job is a folder holding ``.hydra/config.yaml``: the sweeps of ``diffusionflow.train`` and
``diffusionflow.sample``, or a single run. ``--wandb`` logs the table and the figures to one W&B run in
the sweep's group (the folder's name, as the jobs' runs), offline without an API key.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusionflow.config import ConfigError, build_components
from diffusionflow.core.proposals import Adaptive, Proposal
from diffusionflow.core.weightings import Weighting
from diffusionflow.plots import plot_weightings

__all__ = ["Job", "Row", "cli", "find_jobs", "main", "markdown_table", "outcome", "summarize"]

log = logging.getLogger(__name__)

SEED_KEYS = ("seed",)
METRICS = ("final/*", "toy/*", "fid/*", "fd_digits/*", "kid/*", "isc/*", "reflow/*", "nll/*")
SAMPLE_METRICS = (
    "sliced_w2*",
    "energy_distance*",
    "log_density*",
    "nfe",
)  # diffusionflow.sample's metrics.json
CONTEXT = ("*_floor", "*_data", "*nfe")  # reference levels and costs: below the table, not columns
HIGHER_IS_BETTER = ("*log_density*", "isc/*", "*/accuracy*")
BINS = re.compile(r"train_bins/(eps_mse|loss)_([+-]\d+)_([+-]\d+)$")
FIGURES = ("metric_vs_step.png", "metric_vs_nfe.png", "loss_vs_logsnr.png", "weighting.png")
METRICS_JSON, ERROR_LOG = "metrics.json", "error.log"
INTERRUPTED = "interrupted"  # the marker diffusionflow.lightning.interrupt writes on SIGTERM / SIGINT
NOT_DONE = ("failed", "interrupted", "unfinished", "unreadable")
"""Job statuses counted apart from the seeds of a row, never averaged."""
READ_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    yaml.YAMLError,
    OmegaConfBaseException,
)
"""What reading a truncated, corrupt or mis-shaped file raises (``json.JSONDecodeError`` is a ValueError)."""
T = TypeVar("T")


class CompareError(ValueError):
    """Bad input, reported as ``error: ...`` with exit status 2."""


@dataclass
class Job:
    """One job folder: its overrides, Hydra's group choices, config and final metrics."""

    path: Path
    overrides: dict[str, str]
    choices: dict[str, str]
    config: DictConfig
    metrics: dict[str, float]
    status: str
    """done | failed | interrupted (the newest of metrics.json, error.log, the interrupted marker) |
    unfinished (none of them, or no metric in metrics.json) | unreadable (a metrics.json that is not JSON)"""
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    label: str = ""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Rows of ``eval/fid.csv`` (its last step) and ``grid.csv`` files: sampler, metric, nfe, value."""
    unreadable: list[str] = field(default_factory=list)
    """``<path>: <reason>`` of each file of the job that could not be read."""

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def seed(self) -> str:
        return " ".join(self.overrides[k] for k in SEED_KEYS if k in self.overrides) or "-"


@dataclass
class Row:
    """One configuration: its jobs and each metric's values over seeds."""

    label: str
    jobs: list[Job]
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(j.done for j in self.jobs)

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        v = [x for x in self.values.get(metric, []) if math.isfinite(x)]
        if not v:
            return math.nan, math.nan, 0
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else math.nan), len(v)


# ---- reading ---------------------------------------------------------------------------------------
def _parse_overrides(path: Path) -> dict[str, str]:
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"expected a YAML list of overrides, got {type(items).__name__}")
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _parse_choices(path: Path) -> dict[str, str]:
    hydra_cfg = OmegaConf.load(path)
    choices = OmegaConf.select(hydra_cfg, "hydra.runtime.choices", default=None) or {}
    return {k: str(v) for k, v in choices.items() if "hydra/" not in k}


def _parse_config(path: Path) -> DictConfig:
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig):
        raise ValueError(f"expected a YAML mapping, got {type(config).__name__}")
    return config


def _parse_metrics(path: Path) -> dict[str, float]:
    metrics = json.loads(path.read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"expected a JSON object, got {type(metrics).__name__}")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _read(path: Path, parse: Callable[[Path], T], default: T, unreadable: list[str]) -> T:
    """``parse(path)``; ``default`` when the file is missing, and also when it cannot be read or parsed,
    which is noted in ``unreadable`` as ``<path>: <reason>`` and logged as a warning."""
    if not path.exists():
        return default
    try:
        return parse(path)
    except READ_ERRORS as err:
        reason = f"{type(err).__name__}: {err}".replace("\n", " ")
        unreadable.append(f"{path}: {reason}")
        log.warning("unreadable: %s: %s", path, reason)
        return default


def outcome(path: Path) -> str | None:
    """The newest of a job folder's outcome files, by modification time: ``metrics.json`` (done),
    ``error.log`` (failed) or the ``interrupted`` marker; None when it has none (still running). A job
    re-run in the same folder leaves the older files behind, so only the newest one counts; on equal
    times the marker wins over the error, the error over the metrics."""
    times = {}
    for name in (INTERRUPTED, ERROR_LOG, METRICS_JSON):  # tie order: first wins
        try:
            times[name] = (path / name).stat().st_mtime_ns
        except OSError:
            continue
    return max(times, key=times.__getitem__) if times else None


def _job(path: Path) -> Job:
    """One job folder, read as far as its files allow: an unreadable file is noted in ``Job.unreadable``
    and the job keeps what the other files say."""
    hydra_dir, unreadable = path / ".hydra", []
    overrides = _read(hydra_dir / "overrides.yaml", _parse_overrides, {}, unreadable)
    choices = _read(hydra_dir / "hydra.yaml", _parse_choices, {}, unreadable)
    config = _read(hydra_dir / "config.yaml", _parse_config, OmegaConf.create(), unreadable)
    newest = outcome(path)
    metrics: dict[str, float] = {}
    if newest == METRICS_JSON:
        read = _read(path / METRICS_JSON, _parse_metrics, None, unreadable)
        status = "unreadable" if read is None else "done" if read else "unfinished"
        metrics = read or {}
    else:
        status = {ERROR_LOG: "failed", INTERRUPTED: "interrupted", None: "unfinished"}[newest]
    if status == "done":
        metrics |= _read(path / "eval" / "nll.json", _likelihoods, {}, unreadable)
    series = _series(path, unreadable)
    evals = [
        rec
        for csv_path in [path / "eval" / "fid.csv", *sorted(path.glob("**/grid.csv"))]
        for rec in _read(csv_path, _eval_rows, [], unreadable)
    ]
    return Job(path, overrides, choices, config, metrics, status, series, evals=evals, unreadable=unreadable)


def _likelihoods(path: Path) -> dict[str, float]:
    """``nll/<method>_{nats,bits_per_dim}`` from ``evaluate nll``'s ``nll.json``."""
    methods = json.loads(path.read_text()).get("methods", {})
    units = {"nats": "nll_nats", "bits_per_dim": "bits_per_dim"}
    return {f"nll/{m}_{unit}": float(v[key]) for m, v in methods.items() for unit, key in units.items()}


def _job_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, str(path))


def find_jobs(root: Path) -> list[Job]:
    """Every job under ``root`` (``root`` itself when it is a single run), in sweep order, labelled by
    the overrides that vary between jobs, seeds left out."""
    if not root.is_dir():
        raise CompareError(
            f"{root}: no such folder (expected a multirun folder, e.g. logs/train/multiruns/<date>)"
        )
    if (root / ".hydra" / "config.yaml").exists():
        paths = [root]
    else:
        paths = sorted((p.parents[1] for p in root.glob("*/.hydra/config.yaml")), key=_job_number)
        paths += sorted(
            {p.parents[1] for p in root.glob("*/*/.hydra/config.yaml")} - set(paths), key=_job_number
        )
    if not paths:
        raise CompareError(
            f"{root}: no job folders (folders with .hydra/config.yaml) in it or one level below"
        )
    jobs = [_job(p) for p in paths]
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides if k not in SEED_KEYS))
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    for j in jobs:
        j.label = " ".join(f"{k}={j.overrides.get(k, '-')}" for k in varying) or "all"
    return jobs


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def table_metrics(jobs: Sequence[Job], patterns: Sequence[str]) -> list[str]:
    """The metric keys of the table: those matching ``patterns``, reference levels and NFE left out."""
    keys = dict.fromkeys(k for j in jobs for k in j.metrics if _matches(k, patterns))
    return [k for k in keys if not _matches(k, CONTEXT)]


def summarize(jobs: Sequence[Job], metrics: Sequence[str]) -> list[Row]:
    """Rows in sweep order of first appearance; values from the jobs that finished."""
    rows: dict[str, Row] = {}
    for j in jobs:
        row = rows.setdefault(j.label, Row(j.label, []))
        row.jobs.append(j)
        if j.done:
            for m in metrics:
                if m in j.metrics:
                    row.values.setdefault(m, []).append(j.metrics[m])
    return list(rows.values())


# ---- tables ----------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.4g}"


def _best(rows: Sequence[Row], metric: str) -> str | None:
    means = {r.label: r.mean_std(metric)[0] for r in rows}
    finite = {k: v for k, v in means.items() if math.isfinite(v)}
    if len(finite) < 2:
        return None
    pick = max if _matches(metric, HIGHER_IS_BETTER) else min
    return pick(finite, key=finite.__getitem__)


def markdown_table(
    rows: Sequence[Row],
    metrics: Sequence[str],
    context: dict[str, float] | None = None,
    unreadable: Sequence[str] = (),
) -> str:
    """Mean ± std (n) per configuration; the best mean of each column in bold (↓ lower / ↑ higher is
    better); reference levels (noise floors, exact samples' log-density) and NFE below the table, and a
    line ``unreadable: <path>: <reason>`` per file left out."""
    arrows = ["↑" if _matches(m, HIGHER_IS_BETTER) else "↓" for m in metrics]
    head = ["configuration", "seeds", *[f"{m} {a}" for m, a in zip(metrics, arrows, strict=True)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {m: _best(rows, m) for m in metrics}
    for r in rows:
        missing = ", ".join(f"{r.count(s)} {s}" for s in NOT_DONE if r.count(s))
        cells = [f"`{r.label}`", f"{r.n}" + (f" ({missing})" if missing else "")]
        for m in metrics:
            mean, std, _ = r.mean_std(m)
            cell = f"{_fmt(mean)} ± {_fmt(std)}"
            cells.append(f"**{cell}**" if best[m] == r.label else cell)
        lines.append("| " + " | ".join(cells) + " |")
    if context:
        lines.append("")
        lines.append(
            "Reference levels and cost (mean over all jobs): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in context.items())
        )
    if unreadable:
        lines.append("")
        lines += [f"unreadable: {u}  " for u in unreadable]  # two spaces: a Markdown line break
    return "\n".join(lines) + "\n"


def context_values(jobs: Sequence[Job], patterns: Sequence[str]) -> dict[str, float]:
    keys = dict.fromkeys(k for j in jobs for k in j.metrics if _matches(k, patterns) and _matches(k, CONTEXT))
    done = [j for j in jobs if j.done]
    return {k: statistics.fmean(j.metrics[k] for j in done if k in j.metrics) for k in keys}


def write_csvs(rows: Sequence[Row], jobs: Sequence[Job], metrics: Sequence[str], out: Path) -> None:
    with (out / "comparison.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "configuration",
                "seeds",
                *NOT_DONE,
                *[f"{m}_{s}" for m in metrics for s in ("mean", "std")],
            ]
        )
        for r in rows:
            w.writerow(
                [r.label, r.n, *(r.count(s) for s in NOT_DONE)]
                + [v for m in metrics for v in r.mean_std(m)[:2]]
            )
    keys = list(dict.fromkeys(k for j in jobs for k in j.metrics))
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "configuration", "seed", "status", *keys])
        for j in jobs:
            w.writerow([j.path.name, j.label, j.seed, j.status, *[j.metrics.get(k, "") for k in keys]])


# ---- time series -----------------------------------------------------------------------------------
def _csv_series(path: Path) -> dict[str, dict[int, float]]:
    """metric → {step: value} of one CSV logger file."""
    out: dict[str, dict[int, float]] = {}
    with path.open() as f:
        for rec in csv.DictReader(f):
            step = int(float(rec.get("step") or -1))
            for k, v in rec.items():
                if k not in ("step", "epoch", None) and v not in ("", None):
                    out.setdefault(k, {})[step] = float(v)
    return out


def _series(job_dir: Path, unreadable: list[str] | None = None) -> dict[str, dict[int, float]]:
    """metric → {step: value} from the job's CSV logger files; an unreadable file is skipped and noted
    in ``unreadable``."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(job_dir.glob("csv*/**/metrics.csv")):
        for k, steps in _read(path, _csv_series, {}, [] if unreadable is None else unreadable).items():
            out.setdefault(k, {}).update(steps)
    return out


def step_curves(rows: Sequence[Row], key: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """label → (steps, mean, std) of a series over the row's seeds."""
    agg = {}
    for r in rows:
        by_step: dict[int, list[float]] = {}
        for j in r.jobs:
            for step, v in j.series.get(key, {}).items():
                by_step.setdefault(step, []).append(v)
        if by_step:
            steps = sorted(by_step)
            agg[r.label] = (
                steps,
                [statistics.fmean(by_step[s]) for s in steps],
                [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps],
            )
    return agg


def plot_metric_vs_step(rows: Sequence[Row], patterns: Sequence[str], path: Path) -> bool:
    """Each metric logged at two or more steps (table metrics, ``train/loss_epoch``, ``val/loss``)."""
    keys = dict.fromkeys(
        k
        for r in rows
        for j in r.jobs
        for k, s in j.series.items()
        if len(s) > 1
        and (_matches(k, patterns) or k in ("train/loss_epoch", "val/loss"))
        and not _matches(k, CONTEXT)
    )
    if not keys:
        return False
    keys = sorted(keys, key=lambda k: "loss" in k)  # quality metrics first, losses last
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = []
        for label, (steps, mean, std) in step_curves(rows, key).items():
            (line,) = ax.plot(steps, mean, marker=".", label=label)
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
            values += mean
        ax.set_yscale("log" if min(values) > 0 else "symlog")
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        ax.set_title(key + (" (not comparable across weightings)" if "loss" in key else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- metric vs NFE ---------------------------------------------------------------------------------
def _nfe_points(job: Job, patterns: Sequence[str]) -> list[tuple[str, str, int, float]]:
    """(sampler, metric, NFE, value) of a job: its final metrics with the run's sampler, the last step's
    rows of ``eval/fid.csv`` and every ``grid.csv`` under the job (read with the job: ``Job.evals``)."""
    points = []
    nfe = job.metrics.get("final/nfe", job.metrics.get("nfe"))
    sampler = job.choices.get("sampler", str(OmegaConf.select(job.config, "sampler._target_", default="?")))
    if nfe is not None:
        for k, v in job.metrics.items():
            if _matches(k, patterns) and not _matches(k, CONTEXT) and "/" not in k.removeprefix("final/"):
                points.append((sampler, k, int(nfe), v))
    points += [(r["sampler"], r["metric"], r["nfe"], r["value"]) for r in job.evals]
    return points


def _eval_rows(path: Path) -> list[dict[str, Any]]:
    """(sampler, metric, nfe, value) records of an ``eval/fid.csv`` (its last step's rows) or a
    ``grid.csv``; a missing column or a value that is not a number makes the file unreadable."""
    with path.open() as f:
        recs = list(csv.DictReader(f))
    if recs and "step" in recs[0]:
        last = max(int(r["step"]) for r in recs)
        recs = [r for r in recs if int(r["step"]) == last]
    return [
        {"sampler": r["sampler"], "metric": r["metric"], "nfe": int(r["nfe"]), "value": float(r["value"])}
        for r in recs
    ]


def nfe_curves(rows: Sequence[Row], patterns: Sequence[str]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """metric → line (sampler and the configuration without its sampler keys) → NFE → values over seeds."""
    data: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in rows:
        for j in r.jobs:
            rest = " ".join(p for p in j.label.split() if not p.startswith("sampler") and j.label != "all")
            for sampler, metric, nfe, v in _nfe_points(j, patterns):
                line = f"{sampler} {rest}".strip()
                data.setdefault(metric, {}).setdefault(line, {}).setdefault(nfe, []).append(v)
    return data


def _log_axes(ax: plt.Axes, values: Sequence[float]) -> None:
    """Log x (NFE, plain tick labels); log y for positive metrics, symlog for log-densities."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_yscale("log" if min(values) > 0 else "symlog")


def plot_metric_vs_nfe(
    rows: Sequence[Row], patterns: Sequence[str], context: dict[str, float], path: Path
) -> bool:
    """One panel per metric, one line per sampler (mean ± std over seeds), the metric's reference level
    dashed; drawn when some sampler has two or more NFEs."""
    data = nfe_curves(rows, patterns)
    data = {m: lines for m, lines in data.items() if any(len(pts) > 1 for pts in lines.values())}
    if not data:
        return False
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], data.items(), strict=True):
        values = []
        for line, pts in lines.items():
            nfes = sorted(pts)
            mean = [statistics.fmean(pts[n]) for n in nfes]
            std = [statistics.stdev(pts[n]) if len(pts[n]) > 1 else 0.0 for n in nfes]
            ax.errorbar(nfes, mean, yerr=std, marker="o", capsize=3, label=line)
            values += mean
        for suffix in ("_floor", "_data"):
            ref = context.get(f"{metric}{suffix}", context.get(f"final/{metric}{suffix}"))
            if ref is not None:
                ax.axhline(ref, color="grey", linestyle="--", label=f"reference ({metric}{suffix})")
                values.append(ref)
        _log_axes(ax, values)
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- loss per λ bin --------------------------------------------------------------------------------
def _last_bins(job: Job) -> dict[str, dict[float, float]]:
    """kind (eps_mse | loss) → {bin centre: the last logged value}."""
    out: dict[str, dict[float, float]] = {}
    for key, series in job.series.items():
        m = BINS.match(key)
        if m and series:
            out.setdefault(m[1], {})[(float(m[2]) + float(m[3])) / 2] = series[max(series)]
    return out


def plot_loss_vs_logsnr(rows: Sequence[Row], path: Path) -> bool:
    kinds = {"eps_mse": "ε-MSE E‖ε̂ − ε‖²/D", "loss": "weighted loss ½ (w/p) ‖ε̂ − ε‖²/D"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for r in rows:
        per_job = [_last_bins(j) for j in r.jobs if j.done]
        for ax, kind in zip(axes, kinds, strict=True):
            centres = sorted({c for b in per_job for c in b.get(kind, {})})
            if not centres:
                continue
            mean = [statistics.fmean(b[kind][c] for b in per_job if c in b.get(kind, {})) for c in centres]
            ax.plot(centres, mean, marker="o", label=r.label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for ax, title in zip(axes, kinds.values(), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("log-SNR λ (bin centre)")
        ax.set_title(f"{title}, last epoch, mean over seeds", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- weighting and proposal ------------------------------------------------------------------------
def components_of(job: Job) -> tuple[Weighting, Proposal]:
    """The job's weighting and the proposal it trained with (an adaptive one as in its last checkpoint)."""
    comps = build_components(job.config)
    ckpt = job.path / "checkpoints" / "last.ckpt"
    if isinstance(comps.proposal, Adaptive) and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        if "adaptive_proposal" in state:
            comps.proposal.load_state_dict(state["adaptive_proposal"])
    return comps.weighting, comps.proposal


def _plot_row_weightings(rows: Sequence[Row], path: Path) -> bool:
    entries = []
    for r in rows:
        job = next((j for j in r.jobs if j.done), r.jobs[0])
        if "weighting" not in job.config:  # a sampling job: no training components
            continue
        try:
            entries.append((r.label, *components_of(job)))
        except (ConfigError, KeyError, ValueError) as err:
            log.warning("no weighting plot for %s: %s", r.label, err)
    if not entries:
        return False
    plot_weightings(entries, path)
    return True


# ---- W&B -------------------------------------------------------------------------------------------
def log_to_wandb(
    root: Path, jobs: Sequence[Job], rows: Sequence[Row], metrics: Sequence[str], out: Path
) -> str:
    """One W&B run (job_type ``compare``) in the sweep's group: the table and the figures."""
    import wandb

    from diffusionflow.tracking import wandb_mode

    project = str(OmegaConf.select(jobs[0].config, "logger.wandb.project", default="diffusionflow"))
    run = wandb.init(
        project=project,
        group=root.name,
        job_type="compare",
        name=f"compare-{root.name}",
        dir=str(out),
        mode=wandb_mode(),
        config={"multirun": str(root), "jobs": len(jobs)},
    )
    table = wandb.Table(
        columns=["configuration", "seeds", *[f"{m} {s}" for m in metrics for s in ("mean", "std")]]
    )
    for r in rows:
        table.add_data(r.label, r.n, *[v for m in metrics for v in r.mean_std(m)[:2]])
    run.log(
        {"comparison": table, **{p[:-4]: wandb.Image(str(out / p)) for p in FIGURES if (out / p).exists()}}
    )
    run.finish()
    return run.id


# ---- command ---------------------------------------------------------------------------------------
def compare(
    root: Path, out: Path | None = None, patterns: Sequence[str] = METRICS, wandb: bool = False
) -> list[Row]:
    """Reads the jobs under ``root``, writes the table and figures to ``out`` (default
    ``<root>/comparison``), prints the table; returns the rows."""
    jobs = find_jobs(root)
    unreadable = [u for j in jobs for u in j.unreadable]
    patterns = [*patterns, *SAMPLE_METRICS]
    metrics = table_metrics(jobs, patterns)
    if not metrics:
        counts = ", ".join(f"{n} {s}" for s in NOT_DONE if (n := sum(j.status == s for j in jobs)))
        files = "".join(f"; unreadable: {u}" for u in unreadable)
        raise CompareError(
            f"{root}: none of the {len(jobs)} jobs has a metric matching {list(patterns)} in its "
            f"metrics.json ({counts or 'all done'}); pass --metrics with the keys to compare{files}"
        )
    out = root / "comparison" if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(jobs, metrics)
    context = context_values(jobs, patterns)
    table = markdown_table(rows, metrics, context, unreadable)
    (out / "comparison.md").write_text(f"# {root}\n\n{len(jobs)} jobs, mean ± std over seeds\n\n{table}")
    write_csvs(rows, jobs, metrics, out)
    drawn = {
        "metric_vs_step.png": plot_metric_vs_step(rows, patterns, out / "metric_vs_step.png"),
        "metric_vs_nfe.png": plot_metric_vs_nfe(rows, patterns, context, out / "metric_vs_nfe.png"),
        "loss_vs_logsnr.png": plot_loss_vs_logsnr(rows, out / "loss_vs_logsnr.png"),
        "weighting.png": _plot_row_weightings(rows, out / "weighting.png"),
    }
    print(table)
    print(f"wrote {out}/comparison.{{md,csv}}, runs.csv, " + ", ".join(k for k, v in drawn.items() if v))
    if wandb:
        print(f"W&B run {log_to_wandb(root, jobs, rows, metrics, out)} in group {root.name}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusionflow.compare", description=__doc__.split("\n")[0])
    p.add_argument("multirun", type=Path, help="a multirun folder (logs/train/multiruns/<date>_<time>)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <multirun>/comparison)")
    p.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help=f"comma-separated glob patterns of metrics.json keys (default: {','.join(METRICS)})",
    )
    p.add_argument(
        "--wandb", action="store_true", help="also log the table and figures to W&B (sweep's group)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> list[Row]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return compare(args.multirun, args.out, [p for p in args.metrics.split(",") if p], args.wandb)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def cli() -> None:
    """The ``df-compare`` console script: ``main`` on ``sys.argv``, exit status 0 (``main`` returns the
    rows, which ``sys.exit`` would print and turn into status 1)."""
    main()


if __name__ == "__main__":
    cli()
