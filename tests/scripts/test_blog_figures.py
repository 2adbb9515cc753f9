"""scripts/blog_figures.py: the figures exist and the numbers behind them are the blog's claims."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from diffusionflow.core import predictions, samplers, schedules
from helpers import load_script

PNGS = ("weightings.png", "ddim_vs_euler.png", "flow_curvature.png", "ddpm_vs_ddim.png", "weights_h.png")
STEPS = 100


@pytest.fixture(scope="module")
def figures() -> ModuleType:
    return load_script("blog_figures")


@pytest.fixture(scope="module")
def out(figures: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("figures")
    dtype = torch.get_default_dtype()
    figures.main(["--out", str(path), "--tiny"])
    assert torch.get_default_dtype() == dtype, "main must restore the default dtype"
    return path


@pytest.fixture(scope="module")
def data(out: Path) -> dict:
    return json.loads((out / "figures.json").read_text())


@pytest.fixture
def float64(figures: ModuleType) -> Iterator[None]:
    """The scripts' own float64 (and single-thread) setting, restored afterwards."""
    with figures.oracle_precision():
        yield


@pytest.mark.parametrize("name", PNGS)
def test_png_is_a_real_image(out: Path, name: str) -> None:
    path = out / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


# ---- 1. weightings: independent closed forms (math.md §1.4) and the blog figure's numbers --------
LAM = np.linspace(-10.0, 10.0, 1000)


def normal(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


CLOSED_FORMS = {
    "EDM": normal(LAM, 2.4, 2.4) * (np.exp(-LAM) + 0.25),
    "SD3": normal(LAM, 0.0, 2.0) * (1 + np.exp(-LAM / 2)) ** 2,
    "flow": np.exp(-LAM / 2),
    "v (cosine)": np.exp(-LAM / 2),
    "sigmoid": 1 / (1 + np.exp(LAM)),
}
BLOG_AT_10 = {"flow": 4.539993e-5, "EDM": 1.0190646e-3, "SD3": 3.8224852e-7, "sigmoid": 4.539993e-5}


def test_weighting_grid(data: dict) -> None:
    np.testing.assert_allclose(data["weightings"]["logsnr"], LAM, rtol=0, atol=1e-12)


@pytest.mark.parametrize("label", sorted(CLOSED_FORMS))
def test_weighting_matches_closed_form(data: dict, label: str) -> None:
    w = CLOSED_FORMS[label]
    np.testing.assert_allclose(data["weightings"]["curves"][label], w / w.max(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("label", sorted(BLOG_AT_10))
def test_weighting_matches_blog_figure_at_10(data: dict, label: str) -> None:
    assert data["weightings"]["curves"][label][-1] == pytest.approx(BLOG_AT_10[label], rel=1e-6)


def test_every_weighting_is_normalised(data: dict) -> None:
    for label, w in data["weightings"]["curves"].items():
        assert max(w) == pytest.approx(1.0, abs=1e-15), label
        assert min(w) >= 0, label


# ---- 2. DDIM is invariant to scaling the schedule, Euler is not ---------------------------------
def test_ddim_final_samples_do_not_depend_on_the_scaling(data: dict) -> None:
    final = np.array(data["ddim_vs_euler"]["final"]["ddim"])
    assert len(final) == 3
    np.testing.assert_allclose(final, np.broadcast_to(final[0], final.shape), rtol=0, atol=1e-8)


def test_euler_final_samples_depend_on_the_scaling(data: dict) -> None:
    final = np.array(data["ddim_vs_euler"]["final"]["euler"])
    assert np.abs(final[1:] - final[0]).max(axis=1).min() > 1e-4


def test_euler_on_the_flow_schedule_is_ddim(data: dict) -> None:
    """The blog: "Diffusion with DDIM sampler == Flow matching sampler (Euler)" (c_t = 1)."""
    final = data["ddim_vs_euler"]["final"]
    assert data["ddim_vs_euler"]["powers"][0] == 0
    np.testing.assert_allclose(final["euler"][0], final["ddim"][0], rtol=0, atol=1e-8)


# ---- 3. VP straighter for wide data, flow for narrow ---------------------------------------------
@pytest.mark.parametrize("measure", ["bend", "euler_error"])
def test_flow_straighter_for_narrow_vp_for_wide(data: dict, measure: str) -> None:
    fig = data["flow_curvature"]
    assert fig["stds"] == [0.1, 3.0]
    (flow_narrow, flow_wide), (vp_narrow, vp_wide) = fig[measure]["flow"], fig[measure]["vp"]
    assert flow_narrow < vp_narrow
    assert vp_wide < flow_wide


def test_ddpm_figure_samples_are_plausible(data: dict) -> None:
    log_p = data["ddpm_vs_ddim"]["mean_log_prob"]
    for label in ("ddim", "ddpm", "churn 0.5"):
        assert abs(log_p[label] - log_p["exact"]) < 0.5, label
    assert log_p["ddpm"] == pytest.approx(log_p["churn 0.5"], abs=1e-9)  # one update, same noise


# ---- 5. the weights h of the v-predictions (math.md §1.5) ----------------------------------------
def test_ddim_weights_are_nearly_equal_and_closed_form(data: dict) -> None:
    h = np.array(data["weights_h"]["h"]["ddim"])
    assert len(h) == STEPS
    assert h.max() / h.min() < 1.1
    delta = math.pi / (2 * STEPS)
    closed = math.sin(delta) * math.cos(delta) ** (STEPS - 1 - np.arange(STEPS))
    np.testing.assert_allclose(h, closed, rtol=0, atol=1e-10)


def test_ddpm_weights_grow_towards_the_end(data: dict) -> None:
    h = data["weights_h"]["h"]["ddpm"]
    assert h[-1] > h[0]
    assert max(h) > 1.5 * max(data["weights_h"]["h"]["ddim"])
    first = [
        data["weights_h"]["h"][k][0] for k in ("ddim", "churn 0.1", "churn 0.2", "churn 0.3", "churn 0.4")
    ]
    assert first == sorted(first, reverse=True)  # more churn, less weight on the first prediction


def test_churn_half_has_ddpm_weights(figures: ModuleType, float64: None) -> None:
    sched = schedules.build("cosine")
    _, churn = figures.prediction_weights(figures.churn_step(0.5), sched, STEPS)
    _, ddpm = figures.prediction_weights(figures.ddpm_step, sched, STEPS)
    torch.testing.assert_close(churn, ddpm, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "options", "step"),
    [("ddim", {}, "ddim_step"), ("ddpm", {}, "ddpm_step"), ("churn", {"churn": 0.3}, None)],
)
def test_weights_match_the_core_samplers(
    figures: ModuleType, float64: None, name: str, options: dict, step: str | None
) -> None:
    """By linearity: with v̂_k = e_k at the k-th call (sample k sees a unit prediction at step k, the
    others zero), the sampler's output minus its output with v̂ = 0 (same noise) is −h."""
    sched = schedules.build("cosine")
    v = predictions.V()
    steps = 20

    def run(unit: bool) -> torch.Tensor:
        calls = []

        def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            o = sched(t)
            v_hat = torch.zeros_like(z)
            if unit:
                v_hat[len(calls)] = 1.0
            calls.append(t)
            return v.to_x_eps(v_hat, z, o.alpha, o.sigma)[0]

        sampler = samplers.build(name, steps=steps, **options)
        noise = torch.randn(steps, 1, generator=torch.Generator().manual_seed(0))
        return sampler(denoise, noise, sched, generator=torch.Generator().manual_seed(1))[:, 0]

    mean = figures.churn_step(0.3) if step is None else getattr(figures, step)
    _, h = figures.prediction_weights(mean, sched, steps)
    torch.testing.assert_close(run(False) - run(True), h, rtol=0, atol=1e-12)
