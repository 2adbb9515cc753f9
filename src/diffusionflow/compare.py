"""Compare the jobs of a sweep: ``df-compare <multirun folder> [--out DIR] [--wandb]`` (or ``python -m
diffusionflow.compare``).

One row per configuration (the job's command-line overrides, seeds left out) with each final metric as
mean ± standard deviation over its seeds (sample std, ddof = 1), the 95% confidence interval of the mean
(Student t) and the number of seeds; the best mean of a column in bold, and each other row's two-sided
t-test against it (α = 0.05; paired on the per-seed differences when both rows have exactly the same
seeds, else Welch's), ≈ where it is not distinguishable from the best (``diffusionflow.significance``).
A job's outcome is the newest of its ``metrics.json`` (done), ``error.log`` (failed) and
``interrupted`` marker, so a job re-run in its folder counts as its last attempt ended; failed,
interrupted, unfinished (none of them yet) and unreadable jobs are counted apart, never averaged. A
file that cannot be read (``metrics.json``, ``.hydra/*.yaml``, a CSV) is named in a warning and below
the table, and the table is built from the rest. Written to ``<out>/``:

* ``comparison.md`` and ``comparison.csv`` (the table; the Markdown is also printed), ``runs.csv``
  (every job's final metrics), ``best_sigma_rel.csv`` (each line of the σ_rel curves at its best
  post-hoc EMA length, also a table in ``comparison.md``);
* ``metric_vs_step.png`` (metrics logged during training: mean ± std over seeds per configuration),
  ``metric_vs_nfe.png`` (final metrics against the sampler's NFE, one line per sampler; drawn when a
  line has two or more NFEs: a sampler × steps sweep, ``evaluate samplers`` files, several samplers
  in the FID callback), ``<metric>_vs_sigma_rel.png``, ``<metric>_vs_guidance.png`` and
  ``<metric>_vs_train_images.png`` (the ``grid.csv`` / ``eval/fid.csv`` rows with post-hoc EMA weights
  ``sigma_rel:<x>``, a guidance scale, a training-image count: one line per configuration and
  whatever else differs between the rows — sampler, weights, … —, mean ± std over seeds; lines with a
  single x value are left out), ``loss_vs_logsnr.png`` (the last epoch's ε-MSE and weighted loss per
  λ bin) and ``weighting.png`` (each configuration's w(λ), normalised to max 1, and the proposal p(λ)
  it trained with: an adaptive proposal is read back from the job's last checkpoint).

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
from diffusionflow.significance import ALPHA, LEVEL, TTest, confidence_interval, seed_test

__all__ = [
    "AXES",
    "BestSigmaRel",
    "Job",
    "Point",
    "Row",
    "best_sigma_rel",
    "cli",
    "curves",
    "find_jobs",
    "main",
    "markdown_table",
    "outcome",
    "summarize",
    "versus_best",
]

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


@dataclass(frozen=True)
class Point:
    """One measured number of a job with the axes it can be plotted against: a final metric of its
    ``metrics.json`` (sampler and NFE only) or a row of ``eval/fid.csv`` / ``grid.csv``
    (``diffusionflow.metrics.fid.EvalRow``; a column an older file lacks reads as None)."""

    metric: str
    value: float
    sampler: str
    nfe: int
    weights: str = ""
    sigma_rel: float | None = None
    """The EMA length of post-hoc EMA weights ``sigma_rel:<x>``."""
    guidance: float | None = None
    train_images: int | None = None
    num_samples: int | None = None


@dataclass(frozen=True)
class Axis:
    """An x axis of ``curves``: its label, the figure's file name (with ``{metric}``: one figure per
    metric, else one panel per metric in one figure), the base of a log x scale (None: linear) and
    whether y is drawn on a log scale (symlog for metrics that are not all positive)."""

    label: str
    file: str
    log_x_base: int | None = None
    log_y: bool = False


AXES = {
    "nfe": Axis("NFE", "metric_vs_nfe.png", log_x_base=2, log_y=True),
    "sigma_rel": Axis("post-hoc EMA length σ_rel", "{metric}_vs_sigma_rel.png"),
    "guidance": Axis("guidance scale", "{metric}_vs_guidance.png"),
    "train_images": Axis("training images", "{metric}_vs_train_images.png", log_x_base=10, log_y=True),
}
"""The fields of ``Point`` that ``curves`` can put on x."""
SIGMA_REL = "sigma_rel:"
"""The prefix of the weights of a post-hoc EMA reconstruction in an evaluation row."""
Curves = dict[str, dict[str, dict[float, list[float]]]]
"""metric → line → x → values over seeds."""


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
    evals: list[Point] = field(default_factory=list)
    """Rows of ``eval/fid.csv`` (its last step) and ``grid.csv`` files."""
    unreadable: list[str] = field(default_factory=list)
    """``<path>: <reason>`` of each file of the job that could not be read."""

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def seed(self) -> str:
        """The job's seed: its override, else its config's (``-`` when neither has one)."""
        seeds = [
            self.overrides.get(k, OmegaConf.select(self.config, k, throw_on_resolution_failure=False))
            for k in SEED_KEYS
        ]
        return " ".join(str(s) for s in seeds if s is not None) or "-"


@dataclass
class Row:
    """One configuration: its jobs and each metric's values over seeds."""

    label: str
    jobs: list[Job]
    values: dict[str, list[float]] = field(default_factory=dict)
    seeds: dict[str, list[str]] = field(default_factory=dict)
    """The seed of each value of ``values``."""

    @property
    def n(self) -> int:
        return sum(j.done for j in self.jobs)

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    def samples(self, metric: str) -> list[tuple[str, float]]:
        """(seed, value) of each finished job with a finite value of ``metric``."""
        pairs = zip(self.seeds.get(metric, []), self.values.get(metric, []), strict=True)
        return [(s, v) for s, v in pairs if math.isfinite(v)]

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        return _mean_std([v for _, v in self.samples(metric)])

    def ci(self, metric: str) -> tuple[float, float]:
        """The 95% confidence interval of the mean (``significance.confidence_interval``)."""
        return confidence_interval([v for _, v in self.samples(metric)])


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof = 1; nan for one value) and count; nan, nan, 0 for no value."""
    if not values:
        return math.nan, math.nan, 0
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


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
                    row.seeds.setdefault(m, []).append(j.seed)
    return list(rows.values())


# ---- tables ----------------------------------------------------------------------------------------
FOOTER = (
    f"mean ± std [{LEVEL:.0%} CI] over seeds: the sample standard deviation (ddof = 1) and the "
    f"{LEVEL:.0%} confidence interval of the mean, mean ± t_{{{(1 + LEVEL) / 2:g}, n−1}}·s/√n (Student t, "
    "n seeds). **Bold**: the best mean of the column. p: the two-sided t-test of the row against the best "
    f"row at α = {ALPHA:g}, paired (on the per-seed differences, df = n − 1) when both rows have exactly "
    "the same seeds, else Welch's (unequal variances, Welch–Satterthwaite df); ≈: p ≥ α, not "
    "distinguishable from the best. No correction for multiple comparisons. A row with one seed: CI —, "
    "not tested (nor is any row of a column whose best row has one seed)."
)
STATS = ("mean", "std", "ci_low", "ci_high", "p_vs_best", "test")
"""The columns of a metric in ``comparison.csv``; test: best | paired | welch | empty (not tested)."""


def _fmt(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.4g}"


def _higher_is_better(metric: str) -> bool:
    """By ``HIGHER_IS_BETTER``; an evaluation row's metric (``isc``) as the family of a key (``isc/…``)."""
    return _matches(metric, HIGHER_IS_BETTER) or _matches(f"{metric}/", HIGHER_IS_BETTER)


def _best(rows: Sequence[Row], metric: str) -> str | None:
    means = {r.label: r.mean_std(metric)[0] for r in rows}
    finite = {k: v for k, v in means.items() if math.isfinite(v)}
    if len(finite) < 2:
        return None
    pick = max if _higher_is_better(metric) else min
    return pick(finite, key=finite.__getitem__)


def versus_best(rows: Sequence[Row], metric: str) -> dict[str, TTest]:
    """label → the two-sided t-test of the row against the best row of ``metric``
    (``significance.seed_test``: paired on shared seeds, else Welch's), for each other row where both
    have two or more seeds."""
    best = _best(rows, metric)
    if best is None:
        return {}
    ref = next(r for r in rows if r.label == best).samples(metric)
    tests = {r.label: seed_test(ref, r.samples(metric)) for r in rows if r.label != best}
    return {label: test for label, test in tests.items() if test is not None}


def _cell(values: Sequence[float], bold: bool = False) -> str:
    """``mean ± std [CI]``, the mean ± std in bold for the best; ``—`` for no value."""
    mean, std, n = _mean_std(values)
    if n == 0:
        return "—"
    lo, hi = confidence_interval(values)
    text = f"{_fmt(mean)} ± {_fmt(std)}"
    return f"{f'**{text}**' if bold else text} " + (f"[{_fmt(lo)}, {_fmt(hi)}]" if n > 1 else "[—]")


def _verdict(test: TTest | None) -> str:
    """`` ≈ p=0.42 paired`` (not distinguishable from the best), `` p=0.001 welch``, or nothing."""
    if test is None:
        return ""
    return f" {'≈ ' if test.p >= ALPHA else ''}p={test.p:.2g} {test.kind}"


def _arrow(metric: str) -> str:
    return "↑" if _higher_is_better(metric) else "↓"


def markdown_table(
    rows: Sequence[Row],
    metrics: Sequence[str],
    context: dict[str, float] | None = None,
    unreadable: Sequence[str] = (),
    sigma_rel: Sequence[BestSigmaRel] = (),
) -> str:
    """Mean ± std [95% CI] per configuration; the best mean of each column in bold (↓ lower / ↑ higher
    is better), each other row's p-value against it with ≈ where p ≥ α, and ``FOOTER`` stating the
    methods; reference levels (noise floors, exact samples' log-density) and NFE below the table, then
    each line of the σ_rel curves at its best σ_rel (``best_sigma_rel``), and a line
    ``unreadable: <path>: <reason>`` per file left out."""
    head = ["configuration", "seeds", *[f"{m} {_arrow(m)}" for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {m: _best(rows, m) for m in metrics}
    tests = {m: versus_best(rows, m) for m in metrics}
    for r in rows:
        missing = ", ".join(f"{r.count(s)} {s}" for s in NOT_DONE if r.count(s))
        cells = [f"`{r.label}`", f"{r.n}" + (f" ({missing})" if missing else "")]
        for m in metrics:
            values = [v for _, v in r.samples(m)]
            cells.append(_cell(values, best[m] == r.label) + _verdict(tests[m].get(r.label)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", FOOTER]
    if context:
        lines.append("")
        lines.append(
            "Reference levels and cost (mean over all jobs): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in context.items())
        )
    if sigma_rel:
        lines += [
            "",
            "Each line of the σ_rel curves at its best post-hoc EMA length (the best mean over seeds among "
            "the σ_rel evaluated, chosen on these same numbers):",
            "",
            "| line | metric | best σ_rel | there: mean ± std [95% CI] | seeds | σ_rel evaluated |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{b.line}` | {b.metric} {_arrow(b.metric)} | {b.sigma_rel:g} | {_cell(b.values)} | "
            f"{len(b.values)} | {' '.join(f'{s:g}' for s in b.evaluated)} |"
            for b in sigma_rel
        ]
    if unreadable:
        lines.append("")
        lines += [f"unreadable: {u}  " for u in unreadable]  # two spaces: a Markdown line break
    return "\n".join(lines) + "\n"


def context_values(jobs: Sequence[Job], patterns: Sequence[str]) -> dict[str, float]:
    keys = dict.fromkeys(k for j in jobs for k in j.metrics if _matches(k, patterns) and _matches(k, CONTEXT))
    done = [j for j in jobs if j.done]
    return {k: statistics.fmean(j.metrics[k] for j in done if k in j.metrics) for k in keys}


def table_records(rows: Sequence[Row], metrics: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """The header and records of ``comparison.csv`` (and the W&B table): configuration, seeds, the
    counts of ``NOT_DONE`` and each metric's ``STATS`` (nan where there is no value or no test)."""
    head = ["configuration", "seeds", *NOT_DONE, *[f"{m}_{s}" for m in metrics for s in STATS]]
    best = {m: _best(rows, m) for m in metrics}
    tests = {m: versus_best(rows, m) for m in metrics}
    records = []
    for r in rows:
        rec: list[Any] = [r.label, r.n, *(r.count(s) for s in NOT_DONE)]
        for m in metrics:
            test = tests[m].get(r.label)
            kind = "best" if best[m] == r.label else test.kind if test else ""
            rec += [*r.mean_std(m)[:2], *r.ci(m), test.p if test else math.nan, kind]
        records.append(rec)
    return head, records


def write_csvs(
    rows: Sequence[Row],
    jobs: Sequence[Job],
    metrics: Sequence[str],
    out: Path,
    sigma_rel: Sequence[BestSigmaRel] = (),
) -> None:
    """``comparison.csv`` (``table_records``), ``runs.csv`` and, when there are σ_rel curves,
    ``best_sigma_rel.csv``."""
    head, records = table_records(rows, metrics)
    with (out / "comparison.csv").open("w", newline="") as f:
        csv.writer(f).writerows([head, *records])
    keys = list(dict.fromkeys(k for j in jobs for k in j.metrics))
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "configuration", "seed", "status", *keys])
        for j in jobs:
            w.writerow([j.path.name, j.label, j.seed, j.status, *[j.metrics.get(k, "") for k in keys]])
    if sigma_rel:
        with (out / "best_sigma_rel.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["line", "metric", "sigma_rel", "mean", "std", "seeds", "ci_low", "ci_high", "evaluated"]
            )
            for b in sigma_rel:
                mean, std, n = _mean_std(b.values)
                evaluated = " ".join(f"{s:g}" for s in b.evaluated)
                w.writerow(
                    [b.line, b.metric, b.sigma_rel, mean, std, n, *confidence_interval(b.values), evaluated]
                )


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


# ---- metric vs NFE, σ_rel, guidance, training images ----------------------------------------------
def _points(job: Job, patterns: Sequence[str]) -> list[Point]:
    """A job's measured numbers: its final metrics with the run's sampler and NFE, the last step's rows
    of ``eval/fid.csv`` and every ``grid.csv`` under the job (read with the job: ``Job.evals``);
    reference levels and costs (``CONTEXT``) left out."""
    points = []
    nfe = job.metrics.get("final/nfe", job.metrics.get("nfe"))
    sampler = job.choices.get("sampler", str(OmegaConf.select(job.config, "sampler._target_", default="?")))
    if nfe is not None:
        for k, v in job.metrics.items():
            if _matches(k, patterns) and not _matches(k, CONTEXT) and "/" not in k.removeprefix("final/"):
                points.append(Point(k, v, sampler, int(nfe)))
    return points + [p for p in job.evals if not _matches(p.metric, CONTEXT)]


def _optional(rec: dict[str, str], key: str, parse: Callable[[str], T]) -> T | None:
    """``parse`` of a column's text; None when it is empty or the file (an older one) lacks the column."""
    text = rec.get(key) or ""
    return parse(text) if text else None


def _sigma_rel(weights: str) -> float | None:
    return float(weights.removeprefix(SIGMA_REL)) if weights.startswith(SIGMA_REL) else None


def _eval_rows(path: Path) -> list[Point]:
    """The rows of an ``eval/fid.csv`` (its last step's) or a ``grid.csv``; a missing metric, sampler,
    nfe or value column, or a field that is not a number, makes the file unreadable. Weights, guidance,
    training images and sample counts are read where the file has them."""
    with path.open() as f:
        recs = list(csv.DictReader(f))
    if recs and "step" in recs[0]:
        last = max(int(r["step"]) for r in recs)
        recs = [r for r in recs if int(r["step"]) == last]
    return [
        Point(
            metric=r["metric"],
            value=float(r["value"]),
            sampler=r["sampler"],
            nfe=int(r["nfe"]),
            weights=r.get("weights") or "",
            sigma_rel=_optional(r, "weights", _sigma_rel),
            guidance=_optional(r, "guidance", float),
            train_images=_optional(r, "train_images", int),
            num_samples=_optional(r, "num_samples", int),
        )
        for r in recs
    ]


def _traits(p: Point, x: str) -> tuple[str, ...]:
    """What may tell ``p``'s line apart, its x axis left out: sampler (with its NFE unless x is NFE),
    weights, guidance scale, training images, sample count."""
    return (
        p.sampler if x == "nfe" else f"{p.sampler}{p.nfe}",
        f"weights={p.weights}" if p.weights and x != "sigma_rel" else "",
        f"guidance={p.guidance:g}" if p.guidance is not None and x != "guidance" else "",
        f"train_images={p.train_images}" if p.train_images is not None and x != "train_images" else "",
        f"num_samples={p.num_samples}" if p.num_samples is not None else "",
    )


def curves(rows: Sequence[Row], patterns: Sequence[str], x: str = "nfe") -> Curves:
    """metric → line → x → values over seeds, from the points (``_points``) that have a value of ``x``
    (a key of ``AXES``). A line is a configuration (its label without sampler keys) with its sampler
    and each other trait (``_traits``) that differs between the metric's points, so that points of one
    job that differ in another axis (weights, guidance, …) are never averaged together."""
    if x not in AXES:
        raise ValueError(f"x={x!r}: allowed {list(AXES)}")
    found = [
        (p, " ".join(k for k in j.label.split() if not k.startswith("sampler") and j.label != "all"))
        for r in rows
        for j in r.jobs
        for p in _points(j, patterns)
        if getattr(p, x) is not None
    ]
    data: Curves = {}
    for metric in dict.fromkeys(p.metric for p, _ in found):
        mine = [(p, _traits(p, x), rest) for p, rest in found if p.metric == metric]
        shown = [i == 0 or len({t[i] for _, t, _ in mine}) > 1 for i in range(len(mine[0][1]))]
        lines = data.setdefault(metric, {})
        for p, traits, rest in mine:
            line = " ".join([*(t for t, show in zip(traits, shown, strict=True) if show and t), rest])
            lines.setdefault(line.strip(), {}).setdefault(getattr(p, x), []).append(p.value)
    return data


@dataclass(frozen=True)
class BestSigmaRel:
    """A line of the σ_rel curves at its best post-hoc EMA length: the σ_rel of the best mean over
    seeds, the values there, and the σ_rel evaluated."""

    metric: str
    line: str
    sigma_rel: float
    values: list[float]
    evaluated: list[float]


def best_sigma_rel(rows: Sequence[Row], patterns: Sequence[str]) -> list[BestSigmaRel]:
    """Each line of ``curves(rows, patterns, "sigma_rel")`` with two or more σ_rel, at the σ_rel of its
    best mean (lowest, or highest for ``HIGHER_IS_BETTER``)."""
    out = []
    for metric, lines in curves(rows, patterns, "sigma_rel").items():
        pick = max if _higher_is_better(metric) else min
        for line, pts in lines.items():
            if len(pts) > 1:
                means = {s: statistics.fmean(v) for s, v in pts.items()}
                best = pick(means, key=means.__getitem__)
                out.append(BestSigmaRel(metric, line, best, pts[best], sorted(pts)))
    return out


def _plot_panels(data: Curves, axis: Axis, context: dict[str, float], path: Path) -> None:
    """One panel per metric, one line per line of ``data`` (mean ± std over seeds as error bars), the
    metric's reference level dashed; scales as ``axis`` says (log x only where every x is positive)."""
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], data.items(), strict=True):
        values, positive_x = [], True
        for line, pts in lines.items():
            xs = sorted(pts)
            positive_x &= xs[0] > 0
            mean = [statistics.fmean(pts[v]) for v in xs]
            std = [statistics.stdev(pts[v]) if len(pts[v]) > 1 else 0.0 for v in xs]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=line)
            values += mean
        for suffix in ("_floor", "_data"):
            ref = context.get(f"{metric}{suffix}", context.get(f"final/{metric}{suffix}"))
            if ref is not None:
                ax.axhline(ref, color="grey", linestyle="--", label=f"reference ({metric}{suffix})")
                values.append(ref)
        if axis.log_x_base and positive_x:
            ax.set_xscale("log", base=axis.log_x_base)
            if axis.log_x_base == 2:  # NFE 2, 4, 8, … as plain numbers
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        if axis.log_y:
            ax.set_yscale("log" if min(values) > 0 else "symlog")
        ax.set_xlabel(axis.label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean ± std over seeds", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(
    rows: Sequence[Row], patterns: Sequence[str], x: str, context: dict[str, float], out: Path
) -> list[str]:
    """The lines of ``curves(rows, patterns, x)`` with two or more x values, drawn into ``out /
    AXES[x].file`` (``{metric}`` filled in); returns the names of the files written."""
    figures: dict[str, Curves] = {}
    for metric, lines in curves(rows, patterns, x).items():
        drawn = {line: pts for line, pts in lines.items() if len(pts) > 1}
        if drawn:
            name = AXES[x].file.format(metric=metric.replace("/", "_"))
            figures.setdefault(name, {})[metric] = drawn
    for name, data in figures.items():
        _plot_panels(data, AXES[x], context, out / name)
    return list(figures)


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
    root: Path,
    jobs: Sequence[Job],
    rows: Sequence[Row],
    metrics: Sequence[str],
    out: Path,
    figures: Sequence[str],
) -> str:
    """One W&B run (job_type ``compare``) in the sweep's group: the table (``table_records``) and the
    figures (file names in ``out``)."""
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
    head, records = table_records(rows, metrics)
    table = wandb.Table(columns=head, data=records)
    run.log({"comparison": table, **{Path(p).stem: wandb.Image(str(out / p)) for p in figures}})
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
    sigma_rel = best_sigma_rel(rows, patterns)
    table = markdown_table(rows, metrics, context, unreadable, sigma_rel)
    (out / "comparison.md").write_text(f"# {root}\n\n{len(jobs)} jobs, mean ± std over seeds\n\n{table}")
    write_csvs(rows, jobs, metrics, out, sigma_rel)
    drawn = {
        "metric_vs_step.png": plot_metric_vs_step(rows, patterns, out / "metric_vs_step.png"),
        "loss_vs_logsnr.png": plot_loss_vs_logsnr(rows, out / "loss_vs_logsnr.png"),
        "weighting.png": _plot_row_weightings(rows, out / "weighting.png"),
    }
    figures = [k for k, v in drawn.items() if v] + [
        name for x in AXES for name in plot_curves(rows, patterns, x, context, out)
    ]
    print(table)
    csvs = ["comparison.{md,csv}", "runs.csv", *(["best_sigma_rel.csv"] if sigma_rel else [])]
    print(f"wrote {out}/" + ", ".join(csvs + figures))
    if wandb:
        print(f"W&B run {log_to_wandb(root, jobs, rows, metrics, out, figures)} in group {root.name}")
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
