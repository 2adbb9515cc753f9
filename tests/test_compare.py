"""``python -m diffusionflow.compare`` on multirun folders the tests write: the table's means and sample
standard deviations are those of the values written, its confidence intervals and t-tests those of
scipy.stats on the same numbers (paired on shared seeds, else Welch's), failed jobs are counted and not
averaged, the curves against NFE, σ_rel, guidance and training images are those of the rows written
(old grid.csv files included), the figures appear when their data exist, an adaptive proposal is read
back from the checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict
from scipy import stats

from diffusionflow.compare import (
    METRICS,
    Row,
    best_sigma_rel,
    cli,
    components_of,
    curves,
    find_jobs,
    main,
    step_curves,
    summarize,
    versus_best,
)
from diffusionflow.core.proposals import Adaptive
from diffusionflow.metrics.fid import EvalRow, append_rows
from diffusionflow.significance import paired_t_test, welch_t_test
from train.conftest import compose_train

WEIGHTINGS = ("edm", "flow")
SEEDS = (0, 1, 2)
STEPS = (100, 200)
BINS = ("-2_+0", "+0_+2")


def write_job(
    path: Path, overrides: list[str], config: dict, metrics: dict | None, series: list[dict] | None = None
) -> None:
    """A job folder as Hydra and ``diffusionflow.train`` leave it: ``metrics`` None for a failed job,
    {} for one still running."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    choices = {k: v for k, _, v in (o.partition("=") for o in overrides) if "." not in k}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, path / ".hydra" / "hydra.yaml")
    OmegaConf.save(config, path / ".hydra" / "config.yaml")
    if metrics is None:
        (path / "error.log").write_text("Traceback ...\nRuntimeError: boom\n")
        return
    if not metrics:
        return
    (path / "metrics.json").write_text(json.dumps(metrics))
    if series:
        (path / "csv").mkdir()
        keys = sorted({k for rec in series for k in rec})
        with (path / "csv" / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(series)


def run_config(weighting: str, tmp_path: Path) -> dict:
    cfg = compose_train([f"weighting={weighting}"], tmp_path)
    with open_dict(cfg):
        del cfg.hydra
    return OmegaConf.to_container(cfg)


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> tuple[Path, dict]:
    """weighting ∈ {edm, flow} × seed ∈ {0, 1, 2} with random metrics, then a failed sigmoid job and an
    unfinished edm one."""
    root = tmp_path_factory.mktemp("multirun")
    rng = np.random.default_rng(0)
    written: dict = {}
    n = 0
    config_edm: dict = {}
    for w in WEIGHTINGS:
        config = run_config(w, tmp_path_factory.mktemp(w))
        config_edm = config if w == "edm" else config_edm
        for seed in SEEDS:
            metrics = {
                "final/sliced_w2": rng.uniform(0.05, 0.3),
                "final/log_density": rng.uniform(-1.5, -0.5),
                "fd_digits/500_heun35_ema": rng.uniform(1, 20),
                "final/sliced_w2_floor": 0.05,
                "final/nfe": 35.0,
                "train/loss": 0.5,
            }
            series = [{"step": s, "fd_digits/500_heun35_ema": rng.uniform(1, 20)} for s in STEPS] + [
                {"step": STEPS[-1], **{f"train_bins/eps_mse_{b}": rng.uniform(0.1, 1) for b in BINS}}
            ]
            write_job(
                root / str(n),
                [f"weighting={w}", f"seed={seed}", "trainer.max_steps=200"],
                config,
                metrics,
                series,
            )
            written[(w, seed)] = (metrics, series)
            n += 1
    write_job(
        root / str(n),
        ["weighting=sigmoid", "seed=0", "trainer.max_steps=200"],
        run_config("sigmoid", tmp_path_factory.mktemp("sigmoid")),
        None,
    )
    write_job(root / str(n + 1), ["weighting=edm", "seed=3", "trainer.max_steps=200"], config_edm, {})
    return root, written


def test_table_means_and_stds_are_those_written(multirun, capsys):
    root, written = multirun
    rows = main([str(root)])
    assert [r.label for r in rows] == ["weighting=edm", "weighting=flow", "weighting=sigmoid"]
    assert [(r.n, r.count("failed"), r.count("unfinished")) for r in rows] == [
        (3, 0, 1),
        (3, 0, 0),
        (0, 1, 0),
    ]
    printed = capsys.readouterr().out
    with (root / "comparison" / "comparison.csv").open() as f:
        table = {rec["configuration"]: rec for rec in csv.DictReader(f)}
    for w, row in zip(WEIGHTINGS, rows, strict=False):
        for key in ("final/sliced_w2", "final/log_density", "fd_digits/500_heun35_ema"):
            values = np.array([written[(w, s)][0][key] for s in SEEDS])
            mean, std, n = row.mean_std(key)
            assert n == 3
            assert mean == pytest.approx(values.mean(), abs=1e-12)
            assert std == pytest.approx(values.std(ddof=1), abs=1e-12)
            assert float(table[f"weighting={w}"][f"{key}_mean"]) == pytest.approx(values.mean(), abs=1e-12)
            assert float(table[f"weighting={w}"][f"{key}_std"]) == pytest.approx(
                values.std(ddof=1), abs=1e-12
            )
            assert f"{values.mean():.4g} ± {values.std(ddof=1):.4g}" in printed
    assert math.isnan(rows[2].mean_std("final/sliced_w2")[0])
    assert (
        "| `weighting=sigmoid` | 0 (1 failed) |" in printed
        and "| `weighting=edm` | 3 (1 unfinished) |" in printed
    )
    # reference levels and NFE are context, not columns; the training loss is not a table metric
    header = printed.splitlines()[0]
    assert "final/sliced_w2 ↓" in header and "final/log_density ↑" in header
    assert "floor" not in header and "nfe" not in header and "train/loss" not in header
    assert "final/sliced_w2_floor 0.05" in printed and "final/nfe 35" in printed


def test_best_configuration_is_bold(multirun):
    root, written = multirun
    text = (root / "comparison" / "comparison.md").read_text()
    for key, pick in (("final/sliced_w2", min), ("final/log_density", max)):
        means = {w: np.mean([written[(w, s)][0][key] for s in SEEDS]) for w in WEIGHTINGS}
        best = pick(means, key=means.__getitem__)
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `weighting={best}`"))
        std = np.std([written[(best, s)][0][key] for s in SEEDS], ddof=1)
        assert f"**{means[best]:.4g} ± {std:.4g}**" in line


def test_runs_csv_and_figures(multirun):
    root, _ = multirun
    out = root / "comparison"
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [r["status"] for r in runs] == ["done"] * 6 + ["failed", "unfinished"] and runs[0]["seed"] == "0"
    for name in ("metric_vs_step.png", "loss_vs_logsnr.png", "weighting.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert not (out / "metric_vs_nfe.png").exists()  # one NFE per sampler: nothing to plot against


def test_step_curves_average_over_seeds(multirun):
    root, written = multirun
    rows = summarize(find_jobs(root), ["final/sliced_w2"])
    curves = step_curves(rows, "fd_digits/500_heun35_ema")
    for w in WEIGHTINGS:
        steps, mean, std = curves[f"weighting={w}"]
        assert steps == list(STEPS)
        for i, step in enumerate(STEPS):
            values = [written[(w, s)][1][i]["fd_digits/500_heun35_ema"] for s in SEEDS]
            assert step == written[(w, 0)][1][i]["step"]
            assert mean[i] == pytest.approx(np.mean(values), abs=1e-12)
            assert std[i] == pytest.approx(np.std(values, ddof=1), abs=1e-12)


def test_metric_vs_nfe_from_a_sampler_sweep(tmp_path):
    """A sampler × steps sweep of ``diffusionflow.sample``: one line per sampler, NFE on x."""
    config = {"sampler": {"_target_": "diffusionflow.core.samplers.DDIM"}, "num_samples": 8}
    values: dict = {}
    n = 0
    for sampler in ("ddim", "heun"):
        for steps in (2, 4):
            for seed in (0, 1):
                nfe = steps if sampler == "ddim" else 2 * steps - 1
                value = float(np.random.default_rng(n).uniform())
                metrics = {"nfe": nfe, "sliced_w2": value, "sliced_w2_floor": 0.01}
                write_job(
                    tmp_path / str(n),
                    [f"sampler={sampler}", f"sampler.steps={steps}", f"seed={seed}"],
                    config,
                    metrics,
                )
                values.setdefault((sampler, nfe), []).append(value)
                n += 1
    rows = main([str(tmp_path)])
    lines = curves(rows, ["sliced_w2*", "nfe"], "nfe")["sliced_w2"]
    assert set(lines) == {"ddim", "heun"}
    assert {(s, nfe): v for s, pts in lines.items() for nfe, v in pts.items()} == values
    assert (tmp_path / "comparison" / "metric_vs_nfe.png").stat().st_size > 10_000
    assert not (tmp_path / "comparison" / "weighting.png").exists()  # sampling jobs train nothing


def test_adaptive_proposal_is_read_from_the_checkpoint(tmp_path):
    config = run_config("sigmoid", tmp_path / "cfg")
    write_job(tmp_path / "0", ["weighting=sigmoid"], config, {"final/sliced_w2": 0.1})
    job = find_jobs(tmp_path)[0]
    _, proposal = components_of(job)
    assert isinstance(proposal, Adaptive)
    bins = proposal.bins
    loss_ema = torch.linspace(1.0, 10.0, bins, dtype=torch.float64)
    (tmp_path / "0" / "checkpoints").mkdir()
    torch.save({"adaptive_proposal": {"loss_ema": loss_ema}}, tmp_path / "0" / "checkpoints" / "last.ckpt")
    _, trained = components_of(job)
    # p ∝ w · EMA(ε-MSE) per bin (Kingma & Gao §5): the ratio of the two densities is ∝ the EMA
    ratio = (trained.log_prob(trained.centres) - proposal.log_prob(proposal.centres)).exp()
    expected = loss_ema / (loss_ema * proposal.masses).sum()  # the initial masses sum to 1
    assert torch.allclose(ratio, expected, rtol=1e-9)


def test_bad_input_is_reported_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no job folders" in capsys.readouterr().err
    write_job(tmp_path / "0", ["seed=0"], {"seed": 0}, {"train/loss": 1.0})
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert "none of the 1 jobs has a metric matching" in err and "--metrics" in err
    assert main([str(tmp_path), "--metrics", "train/*"])[0].mean_std("train/loss")[0] == 1.0


def test_console_script_exits_0(tmp_path, monkeypatch, capsys):
    """``df-compare`` runs ``sys.exit(cli())``: ``cli`` returns None (``main``'s rows would exit 1)."""
    write_job(tmp_path / "0", ["seed=0"], {"seed": 0}, {"train/loss": 1.0})
    monkeypatch.setattr(sys, "argv", ["df-compare", str(tmp_path), "--metrics", "train/*"])
    with pytest.raises(SystemExit) as exc:
        sys.exit(cli())
    assert exc.value.code is None and "train/loss" in capsys.readouterr().out


def _age(path: Path, seconds_ago: float) -> None:
    """Sets ``path``'s modification time ``seconds_ago`` seconds in the past."""
    t = path.stat().st_mtime - seconds_ago
    os.utime(path, (t, t))


@pytest.mark.parametrize(
    ("ages", "status"),
    [
        ({"error.log": 60, "metrics.json": 0}, "done"),  # re-run successfully: the error.log is stale
        ({"metrics.json": 60, "error.log": 0}, "failed"),  # finished once, failed when re-run
        ({"metrics.json": 60, "error.log": 30, "interrupted": 0}, "interrupted"),
        ({"interrupted": 60, "metrics.json": 0}, "done"),  # resumed after the interruption and finished
        ({"interrupted": 0}, "interrupted"),
    ],
)
def test_the_newest_outcome_of_a_job_counts(tmp_path, capsys, ages, status):
    write_job(tmp_path / "0", ["weighting=flow", "seed=0"], {"seed": 0}, {"final/sliced_w2": 0.1})
    job = tmp_path / "1"
    write_job(job, ["weighting=flow", "seed=1"], {"seed": 1}, {"final/sliced_w2": 0.3})
    (job / "metrics.json").unlink()
    for name in ages:
        (job / name).write_text('{"final/sliced_w2": 0.3}' if name == "metrics.json" else "x")
    for name, seconds in ages.items():
        _age(job / name, seconds)
    rows = main([str(tmp_path)])
    assert [j.status for j in rows[0].jobs] == ["done", status]
    assert (rows[0].n, rows[0].count(status)) == ((2, 2) if status == "done" else (1, 1))
    assert rows[0].mean_std("final/sliced_w2")[0] == pytest.approx(0.2 if status == "done" else 0.1)
    if status != "done":
        assert f"| `all` | 1 (1 {status}) |" in capsys.readouterr().out
        with (tmp_path / "comparison" / "comparison.csv").open() as f:
            assert next(csv.DictReader(f))[status] == "1"


def test_unreadable_files_are_named_and_the_table_built_from_the_rest(tmp_path, caplog, capsys, monkeypatch):
    for n, value in enumerate((0.1, 0.2, 0.3, 0.4)):
        series = [{"step": 1, "toy/sliced_w2": value}, {"step": 2, "toy/sliced_w2": value / 2}]
        write_job(tmp_path / str(n), [f"seed={n}"], {"seed": n}, {"final/sliced_w2": value}, series)
    broken = {
        tmp_path / "1" / "metrics.json": '{"final/sliced_w2": 0.',  # truncated mid-write
        tmp_path / "2" / "csv" / "metrics.csv": "step,toy/sliced_w2\n1,0.3\n2,abc\n",
        tmp_path / "3" / ".hydra" / "config.yaml": "seed: [0\n",
        tmp_path / "3" / "grid.csv": "metric,value,sampler,nfe,weights\nfid,1.0,heun,35,sigma_rel:abc\n",
    }
    for path, text in broken.items():
        path.write_text(text)
    monkeypatch.setattr(sys, "argv", ["df-compare", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        sys.exit(cli())
    assert exc.value.code is None  # a table was built: exit status 0
    printed = capsys.readouterr().out
    text = (tmp_path / "comparison" / "comparison.md").read_text()
    for path in broken:
        assert f"unreadable: {path}: " in printed and f"unreadable: {path}: " in text
        assert any(
            f"unreadable: {path}: " in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
        )
    assert f"unreadable: {tmp_path / '1' / 'metrics.json'}: JSONDecodeError" in text
    assert "| `all` | 3 (1 unreadable) |" in printed
    rows = summarize(find_jobs(tmp_path), ["final/sliced_w2"])
    assert rows[0].mean_std("final/sliced_w2")[0] == pytest.approx((0.1 + 0.3 + 0.4) / 3)
    # the unreadable metrics.csv of job 2 is left out of the curves; the others are all there
    curves = step_curves(rows, "toy/sliced_w2")["all"]
    assert curves[1] == pytest.approx([(0.1 + 0.2 + 0.4) / 3, (0.05 + 0.1 + 0.2) / 3])


# ---- confidence intervals and tests against the best row -------------------------------------------
def test_confidence_intervals_are_students(multirun):
    """mean ± t_{0.975, n−1}·s/√n, as scipy.stats.t.interval gives it, in comparison.csv and .md."""
    root, written = multirun
    main([str(root)])
    with (root / "comparison" / "comparison.csv").open() as f:
        table = {rec["configuration"]: rec for rec in csv.DictReader(f)}
    text = (root / "comparison" / "comparison.md").read_text()
    for w in WEIGHTINGS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `weighting={w}`"))
        for key in ("final/sliced_w2", "final/log_density", "fd_digits/500_heun35_ema"):
            values = [written[(w, s)][0][key] for s in SEEDS]
            lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
            rec = table[f"weighting={w}"]
            assert float(rec[f"{key}_ci_low"]) == pytest.approx(lo, rel=1e-12)
            assert float(rec[f"{key}_ci_high"]) == pytest.approx(hi, rel=1e-12)
            assert f"[{lo:.4g}, {hi:.4g}]" in line
    assert "mean ± t_{0.975, n−1}·s/√n" in text and "α = 0.05" in text and "Welch" in text


def _seed_jobs(root: Path) -> dict[str, list[float]]:
    """Configurations over seeds 0–3 with a large spread between seeds (0, 10, 20, 30): ``a`` (the best),
    ``b`` = a + 1 on the same seeds, ``c`` = b's values on seeds 4–7, ``d`` = a + 1 with its seeds in
    its config only (no seed override), ``e`` = a on the same seeds, ``f`` = a + 1000 on seeds 4–7,
    ``g`` one seed."""
    a = [0.01, 9.98, 20.0, 30.01]
    b = [x + 1 + eps for x, eps in zip(a, (0.02, -0.01, 0.0, 0.01), strict=True)]
    configs = {
        "a": (a, range(4), True),
        "b": (b, range(4), True),
        "c": (b, range(4, 8), True),
        "d": ([x + 1 + eps for x, eps in zip(a, (0.0, 0.01, -0.02, 0.01), strict=True)], range(4), False),
        "e": (list(a), range(4), True),
        "f": ([x + 1000 for x in a], range(4, 8), True),
        "g": ([50.0], [0], True),
    }
    n = 0
    for name, (values, seeds, override) in configs.items():
        for value, seed in zip(values, seeds, strict=True):
            overrides = [f"weighting={name}", *([f"seed={seed}"] if override else [])]
            write_job(root / str(n), overrides, {"seed": seed}, {"final/sliced_w2": value})
            n += 1
    return {name: values for name, (values, _, _) in configs.items()}


def test_paired_on_shared_seeds_else_welch(tmp_path, capsys):
    """A consistent per-seed offset under a large between-seed spread: the paired test finds it (p < α),
    Welch's on the same numbers does not; other seeds → Welch's; identical → ≈ with p = 1; far worse →
    distinguished; one seed → no CI, no test. Each p-value is scipy's on the same numbers."""
    values = _seed_jobs(tmp_path)
    a = values["a"]
    rows = main([str(tmp_path)])
    tests = versus_best(rows, "final/sliced_w2")
    assert {k.removeprefix("weighting="): t.kind for k, t in tests.items()} == {
        "b": "paired",
        "c": "welch",
        "d": "paired",  # the seeds of its config
        "e": "paired",
        "f": "welch",
    }
    for name, scipy_test in (
        ("b", stats.ttest_rel(values["b"], a)),
        ("c", stats.ttest_ind(values["c"], a, equal_var=False)),
        ("d", stats.ttest_rel(values["d"], a)),
        ("f", stats.ttest_ind(values["f"], a, equal_var=False)),
    ):
        assert tests[f"weighting={name}"].p == pytest.approx(scipy_test.pvalue, rel=1e-9)
        assert tests[f"weighting={name}"].t == pytest.approx(scipy_test.statistic, rel=1e-12)
    assert tests["weighting=b"].p < 0.05 < 0.5 < stats.ttest_ind(values["b"], a, equal_var=False).pvalue
    assert tests["weighting=c"].p > 0.05 and tests["weighting=e"].p == 1.0
    assert tests["weighting=f"].p < 0.05
    printed = capsys.readouterr().out
    cells = {
        ln.split("`")[1].removeprefix("weighting="): ln.strip("| ").split(" | ")[2]
        for ln in printed.splitlines()
        if ln.startswith("| `")
    }
    assert cells["a"].startswith(f"**{np.mean(a):.4g} ± {np.std(a, ddof=1):.4g}**")
    assert "≈" not in cells["b"] and f"p={tests['weighting=b'].p:.2g} paired" in cells["b"]
    assert f"≈ p={tests['weighting=c'].p:.2g} welch" in cells["c"]
    assert "≈ p=1 paired" in cells["e"] and "≈" not in cells["f"] and "≈" not in cells["d"]
    assert cells["g"] == "50 ± — [—]"
    with (tmp_path / "comparison" / "comparison.csv").open() as f:
        table = {rec["configuration"].removeprefix("weighting="): rec for rec in csv.DictReader(f)}
    assert table["a"]["final/sliced_w2_test"] == "best" and table["g"]["final/sliced_w2_test"] == ""
    assert math.isnan(float(table["g"]["final/sliced_w2_ci_low"]))
    assert math.isnan(float(table["g"]["final/sliced_w2_p_vs_best"]))
    for name in "bcdef":
        assert table[name]["final/sliced_w2_test"] == tests[f"weighting={name}"].kind
        assert float(table[name]["final/sliced_w2_p_vs_best"]) == tests[f"weighting={name}"].p


def test_t_tests_are_scipys_and_zero_spread_is_decided():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 5).tolist(), rng.normal(0.5, 2, 7).tolist()
    welch, scipy_welch = welch_t_test(a, b), stats.ttest_ind(b, a, equal_var=False)
    assert (welch.t, welch.df, welch.p) == pytest.approx(
        (scipy_welch.statistic, scipy_welch.df, scipy_welch.pvalue), rel=1e-10
    )
    paired, scipy_paired = paired_t_test(a, b[:5]), stats.ttest_rel(b[:5], a)
    assert (paired.t, paired.df, paired.p) == pytest.approx(
        (scipy_paired.statistic, scipy_paired.df, scipy_paired.pvalue), rel=1e-10
    )
    # no spread of the differences (exact in floats): equal means are indistinguishable, an offset certain
    c = [0.0, 1.0, 2.0, 4.0]
    assert paired_t_test(c, c).p == 1.0 and paired_t_test(c, [x + 1 for x in c]).p == 0.0
    assert welch_t_test([1.0, 1.0], [1.0, 1.0]).p == 1.0 and welch_t_test([1.0, 1.0], [2.0, 2.0]).p == 0.0
    with pytest.raises(ValueError, match=">= 2"):
        welch_t_test([1.0], [1.0, 2.0])


# ---- curves against σ_rel, guidance and training images --------------------------------------------
SIGMA_RELS = (0.05, 0.1, 0.2)
GUIDANCES = (1.0, 2.0, 3.0)
TRAIN_IMAGES = (1000, 2000, 4000)
OLD_FIELDS = [f for f in EvalRow.__dataclass_fields__ if f not in ("guidance", "train_images")]


def _eval_row(value: float, nfe: int = 35, weights: str = "ema", **axes) -> EvalRow:
    return EvalRow(
        key="fid/1000_heun35_ema",
        metric="fid",
        value=value,
        num_samples=1000,
        sampler="heun",
        steps=(nfe + 1) // 2,
        nfe=nfe,
        seeds="0-999",
        weights=weights,
        reference="{}",
        sampler_config="{}",
        **axes,
    )


def _write_old_csv(path: Path, extra: dict, rows: list[EvalRow]) -> None:
    """``rows`` in a CSV as written before the guidance and train_images columns, ``extra`` first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*extra, *OLD_FIELDS])
        writer.writeheader()
        writer.writerows({**extra, **{k: vars(row)[k] for k in OLD_FIELDS}} for row in rows)


@pytest.fixture(scope="module")
def eval_sweep(tmp_path_factory) -> tuple[Path, list[Row], dict]:
    """weighting ∈ {edm, flow} × 3 seeds, each job with ``grid.csv`` files as ``evaluate samplers``
    writes them: post-hoc EMA σ_rel, guidance (with EMA and raw weights) and snapshots (training
    images), and an old-format ``grid.csv`` (no guidance / train_images columns) over NFE; the
    compared rows and the expected curves: x axis → line → x → values in job order."""
    root = tmp_path_factory.mktemp("evals")
    rng = np.random.default_rng(2)
    best = {"edm": 0.05, "flow": 0.2}  # each configuration's best σ_rel, up to the noise
    expected: dict = {x: {} for x in ("sigma_rel", "guidance", "train_images", "nfe")}

    def add(x: str, line: str, at: float, value: float) -> None:
        expected[x].setdefault(line, {}).setdefault(at, []).append(value)

    for n, (w, seed) in enumerate((w, s) for w in best for s in SEEDS):
        job = root / str(n)
        write_job(job, [f"weighting={w}", f"seed={seed}"], {"seed": seed}, {"fd_digits/x": 1.0})
        noise = rng.normal(0, 0.01, 18).tolist()
        ema = [(s, 10 + 100 * (s - best[w]) ** 2 + noise.pop()) for s in SIGMA_RELS]
        append_rows(job / "ema" / "grid.csv", [_eval_row(v, weights=f"sigma_rel:{s}") for s, v in ema])
        guided = [(g, wt, 5 + g + (wt == "raw") + noise.pop()) for g in GUIDANCES for wt in ("ema", "raw")]
        append_rows(job / "cfg" / "grid.csv", [_eval_row(v, weights=wt, guidance=g) for g, wt, v in guided])
        snaps = [(i, 100 / i + noise.pop()) for i in TRAIN_IMAGES]
        append_rows(job / "snap" / "grid.csv", [_eval_row(v, train_images=i) for i, v in snaps])
        old = [(nfe, 20 / nfe + noise.pop()) for nfe in (9, 17, 35)]
        _write_old_csv(job / "old" / "grid.csv", {"checkpoint": "c"}, [_eval_row(v, nfe=k) for k, v in old])
        cfg = f"weighting={w}"
        for s, v in ema:
            add("sigma_rel", f"heun35 {cfg}", s, v)
        for g, wt, v in guided:
            add("guidance", f"heun35 weights={wt} {cfg}", g, v)
        for i, v in snaps:
            add("train_images", f"heun35 {cfg}", i, v)
        for nfe, v in old:  # the NFE plot tells the old rows apart from the others by what they lack
            add("nfe", f"heun weights=ema {cfg}", nfe, v)
    return root, main([str(root)]), expected


def test_curves_against_sigma_rel_guidance_and_training_images(eval_sweep):
    root, rows, expected = eval_sweep
    assert not any(j.unreadable for r in rows for j in r.jobs)
    for x in ("sigma_rel", "guidance", "train_images"):
        assert curves(rows, METRICS, x) == {"fid": expected[x]}, x
        assert (root / "comparison" / f"fid_vs_{x}.png").stat().st_size > 10_000, x
    # against NFE, the new rows are single points (NFE 35) on lines of their own, left out of the plot
    nfe = curves(rows, METRICS, "nfe")["fid"]
    assert {line: pts for line, pts in nfe.items() if len(pts) > 1} == expected["nfe"]
    assert all(35 in pts and len(pts) == 1 for line, pts in nfe.items() if line not in expected["nfe"])
    assert (root / "comparison" / "metric_vs_nfe.png").stat().st_size > 10_000


def test_best_sigma_rel_of_each_configuration(eval_sweep):
    root, rows, expected = eval_sweep
    found = best_sigma_rel(rows, METRICS)
    assert [(b.metric, b.line) for b in found] == [("fid", line) for line in expected["sigma_rel"]]
    text = (root / "comparison" / "comparison.md").read_text()
    with (root / "comparison" / "best_sigma_rel.csv").open() as f:
        table = {rec["line"]: rec for rec in csv.DictReader(f)}
    for b in found:
        pts = expected["sigma_rel"][b.line]
        means = {s: np.mean(v) for s, v in pts.items()}
        sigma = min(means, key=means.__getitem__)
        assert (b.sigma_rel, b.values, b.evaluated) == (sigma, pts[sigma], list(SIGMA_RELS))
        assert float(table[b.line]["sigma_rel"]) == sigma and int(table[b.line]["seeds"]) == len(SEEDS)
        assert float(table[b.line]["mean"]) == pytest.approx(means[sigma], rel=1e-12)
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{b.line}` | fid ↓ | {sigma:g} |"))
        assert f"{means[sigma]:.4g} ± {np.std(pts[sigma], ddof=1):.4g}" in line
    assert {b.line.split()[-1]: b.sigma_rel for b in found} == {"weighting=edm": 0.05, "weighting=flow": 0.2}


def test_old_grid_csv_without_the_new_columns(tmp_path):
    """A ``grid.csv`` and an ``eval/fid.csv`` written before the guidance and train_images columns."""
    values: dict = {}
    for n, seed in enumerate((0, 1)):
        job = tmp_path / str(n)
        write_job(job, [f"seed={seed}"], {"seed": seed}, {"fd_digits/x": 1.0})
        for name, extra, nfes in (
            ("grid.csv", {"checkpoint": "c"}, (9, 17)),
            ("eval/fid.csv", {"step": 4}, [35]),
        ):
            for nfe in nfes:
                values.setdefault(nfe, []).append(1 / nfe + seed)
            _write_old_csv(job / name, extra, [_eval_row(1 / nfe + seed, nfe=nfe) for nfe in nfes])
    rows = main([str(tmp_path)])
    assert not any(j.unreadable for r in rows for j in r.jobs)
    assert curves(rows, METRICS, "nfe") == {"fid": {"heun": values}}
    assert all(curves(rows, METRICS, x) == {} for x in ("sigma_rel", "guidance", "train_images"))
    assert (tmp_path / "comparison" / "metric_vs_nfe.png").exists()
    assert not (tmp_path / "comparison" / "best_sigma_rel.csv").exists()
