"""``python -m diffusionflow.compare`` on multirun folders the tests write: the table's means and sample
standard deviations are those of the values written, failed jobs are counted and not averaged, the
figures appear when their data exist, an adaptive proposal is read back from the checkpoint."""

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

from diffusionflow.compare import cli, components_of, find_jobs, main, nfe_curves, step_curves, summarize
from diffusionflow.core.proposals import Adaptive
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
    curves = nfe_curves(rows, ["sliced_w2*", "nfe"])["sliced_w2"]
    assert set(curves) == {"ddim", "heun"}
    assert {(s, nfe): v for s, pts in curves.items() for nfe, v in pts.items()} == values
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
