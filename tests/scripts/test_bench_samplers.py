"""scripts/bench_samplers.py on a tiny setting: tables, NFE accounting, convergence, the reference."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from diffusionflow.core import schedules
from helpers import load_script

NFES = (5, 10, 20)
N = 24


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_samplers")


@pytest.fixture(scope="module")
def float64(bench: ModuleType) -> Iterator[None]:
    """The scripts' own float64 (and single-thread) setting, restored afterwards."""
    with bench.oracle_precision():
        yield


@pytest.fixture(scope="module")
def result(bench: ModuleType, float64: None):
    return bench.bench_mixture("2-D mixture", bench.mixture_2d(), N, NFES)


def rows_by_title(rows) -> dict:
    return {row.title: row for row in rows}


def test_a_row_per_sampler_and_finite_values(bench: ModuleType, result) -> None:
    peers = bench.diffusers_available()
    for rows, specs, metrics in (
        (result.deterministic, bench.DETERMINISTIC + (bench.PEERS if peers else ()), ("rms", "median")),
        (result.stochastic, bench.STOCHASTIC + (bench.PEER_SDE if peers else ()), ("energy",)),
    ):
        assert [row.title for row in rows] == [spec.title for spec in specs]
        for row in rows:
            if " bh1 / " in row.title and row.title.startswith("diffusers"):
                continue  # diffusers' B(h) = h is NaN on the step to σ = 0 (−∞ · 0): see the agreement test
            for metric in metrics:
                assert list(row.values[metric]) == list(NFES)
                assert all(math.isfinite(v) and v >= 0 for v in row.values[metric].values()), row.title
    assert math.isfinite(result.null) and result.null > 0


def test_markdown_table_has_a_row_per_sampler_and_a_column_per_nfe(bench: ModuleType, result) -> None:
    text = bench.report([result], NFES)
    for rows, header_cells in ((result.deterministic, len(NFES) + 1), (result.stochastic, len(NFES) + 2)):
        for row in rows:
            lines = [line for line in text.splitlines() if line.startswith(f"| {row.title} |")]
            assert lines, row.title
            # a stochastic row with a twin is also in the agreement table, which has no null column
            assert all(line.count("|") in (header_cells + 1, len(NFES) + 2) for line in lines)
    assert "| sampler / grid | NFE 5 | NFE 10 | NFE 20 |" in text
    assert f"At NFE {bench.WINNER_NFE}, 2-D mixture, cosine: lowest RMS error" in text


def test_true_nfe_is_recorded(result) -> None:
    rows = rows_by_title(result.deterministic + result.stochastic)
    for title, row in rows.items():
        two_evals = title.startswith(("heun", "edm", "diffusers Heun"))
        expected = {n: 2 * ((n + 1) // 2) - 1 if two_evals else n for n in NFES}
        assert row.nfe == expected, title
    assert rows["heun / edm"].nfe[10] == 9


@pytest.mark.parametrize(
    "title",
    [
        "heun / edm",
        "dpmpp_2m / uniform_t",
        "dpmpp_2m / uniform_logsnr",
        "dpmpp_2m / edm",
        "dpmpp_3m shift 2 / uniform_t",
        "unipc-2 bh2 shift 2 / uniform_t",
        "unipc-3 bh2 shift 2 / uniform_t",
    ],
)
def test_higher_order_errors_decrease_with_nfe(result, title: str) -> None:
    rms = rows_by_title(result.deterministic)[title].values["rms"]
    assert rms[20] < rms[10] < rms[5]


def test_reference_is_converged(result) -> None:
    assert result.reference_gap < 1e-6


def test_reference_solves_the_same_ode_as_the_samplers(bench: ModuleType, float64: None) -> None:
    """A fine DPM-Solver++(2M) run lands on the DOP853 reference (so the reference ODE is right, not
    merely self-consistent)."""
    gmm, sched = bench.mixture_2d(), schedules.build("cosine")
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    fine = bench.Spec("dpmpp_2m", "uniform_t").build(400)
    ref = bench.reference_solution(gmm, sched, noise, float(fine.times(sched)[0]), 1e-10)
    x = fine(bench.oracle_denoiser(gmm, sched), noise, sched)
    assert bench.sample_errors(x, ref).max() < 1e-3


def test_ddpm_ddim_eta1_and_churn_half_are_one_update(result) -> None:
    rows = rows_by_title(result.stochastic)
    ddpm = rows["ddpm / uniform_t"].values["energy"]
    for title in ("ddim η=1 / uniform_t", "churn 0.5 / uniform_t"):
        assert rows[title].values["energy"] == pytest.approx(ddpm, rel=1e-9)


def test_best_names_every_tied_sampler(bench: ModuleType, result) -> None:
    rows = [row for row in result.stochastic if row.title.startswith(("ddpm", "ddim", "churn"))]
    title, value = bench.best(rows, "energy", 10)
    assert title == "ddpm / uniform_t = ddim η=1 / uniform_t = churn 0.5 / uniform_t"
    assert value == pytest.approx(rows[0].values["energy"][10], rel=1e-9)


def test_energy_distance(bench: ModuleType, float64: None) -> None:
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    assert bench.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert bench.energy_distance(x, x + 1.0) > 0.5


def test_mixture_16d_is_seeded(bench: ModuleType, float64: None) -> None:
    a, b = bench.mixture_16d(), bench.mixture_16d()
    assert a.dim == 16
    torch.testing.assert_close(a.covariances, b.covariances, rtol=0, atol=0)
    assert not torch.equal(a.covariances[0], a.covariances[1])


def test_plot_writes_an_image(bench: ModuleType, result, tmp_path: Path) -> None:
    bench.plot([result], tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 5000


def test_diffusers_rows_agree_with_ours_where_the_method_is_the_same(bench: ModuleType, result) -> None:
    """Every twin pair at float32 precision below 15 steps (at 20, diffusers' 3M keeps order 3 on the
    step before the last, ours does not), except B₁ UniPC, which diffusers cannot run to σ = 0."""
    if not bench.diffusers_available():
        pytest.skip("diffusers is not installed (the bench extra)")
    twins = [row for row in result.deterministic + result.stochastic if "diff" in row.values]
    assert len(twins) == sum(peer.twin is not None for peer in bench.PEERS + bench.PEER_SDE)
    for row in twins:
        for nfe in (5, 10):
            if " bh1 / " in row.title:
                assert math.isnan(row.values["diff"][nfe]), row.title
            else:
                assert row.values["diff"][nfe] < 1e-4, (row.title, nfe)
    text = bench.report([result], NFES)
    assert "Agreement: max |x_diffusers − x_ours|" in text
    assert all(f"| {row.title} |" in text for row in twins)
