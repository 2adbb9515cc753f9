"""Reflow: paired-noise training, deterministic cached pairs (``make_reflow_pairs``, read by the
``ReflowPairs`` dataset), the errors, and the claim itself on a tiny run: the child of a toy2d parent is
straighter and better in one step."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

import diffusionflow.reflow
from diffusionflow.checkpoint import load_module
from diffusionflow.core import predictions, proposals, samplers, schedules, weightings
from diffusionflow.data.reflow_pairs import ReflowPairs
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.metrics.generate import generate
from diffusionflow.nn import MLP
from diffusionflow.reflow import make_reflow_pairs
from diffusionflow.train import train
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["backbone.width=64", "backbone.depth=2", "backbone.emb_dim=32", "data.batch_size=256", "logger=none"]
PAIRS = {"name": "dpmpp_2m", "steps": 12, "grid": "edm"}


def _train(out: Path, overrides: list[str]) -> dict[str, float]:
    try:
        return train(compose_train(overrides, out))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A tiny MLP trained 300 steps on the blog mixture: good with many steps, curved paths."""
    out = tmp_path_factory.mktemp("parent")
    _train(out, [*TINY, "trainer.max_steps=300", "data.train_dataset.n=8192"])
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def child(parent, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("child")
    metrics = _train(
        out,
        [
            *TINY,
            "experiment=reflow_toy2d",
            f"data.train_dataset.pairs.parent_ckpt={parent}",
            "data.train_dataset.pairs.num_pairs=4096",
            *(f"data.train_dataset.pairs.sampler.{k}={v}" for k, v in PAIRS.items()),
            f"data.train_dataset.pairs.cache={out / 'pairs.npz'}",
            "trainer.max_steps=300",
            "callbacks.reflow.num_samples=1024",
            "callbacks.reflow.straightness_steps=64",
        ],
    )
    return out, metrics


def _pairs(parent: Path, cache: Path | None, **kw: Any) -> ReflowPairs:
    args = {
        "sampler": PAIRS,
        "num_pairs": 96,
        "batch_size": 64,
        "cache": None if cache is None else str(cache),
    }
    return ReflowPairs(str(make_reflow_pairs(str(parent), **{**args, **kw})))


def test_the_child_is_straighter_and_better_in_one_step(child):
    out, metrics = child
    report = json.loads((out / "reflow.json").read_text())
    assert report["child"]["straightness"] < 0.5 * report["parent"]["straightness"]
    assert report["child"]["sliced_w2_1step"] < report["parent"]["sliced_w2_1step"]
    assert report["pairs"]["cache"] == str(out / "pairs.npz")
    for name in ("child", "parent"):  # in metrics.json, through trainer.callback_metrics
        for key, value in report[name].items():
            assert metrics[f"reflow/{name}_{key}"] == pytest.approx(value, rel=1e-6)
    assert metrics["reflow/sliced_w2_floor"] == pytest.approx(
        report["reference"]["sliced_w2_floor"], rel=1e-6
    )


def test_pairs_are_deterministic_and_cached(parent, tmp_path, monkeypatch):
    first = _pairs(parent, tmp_path / "a.npz")
    x, y, noise = first[5]
    assert x.shape == noise.shape == (2,) and y == 0 and len(first) == 96
    assert (first.shape, first.num_classes) == ((2,), 0) and first.mixture is not None  # the blog mixture's
    assert first.reference_samples(10, seed=1).shape == (10, 2)
    # another batch size, another file: the same pairs
    again = _pairs(parent, tmp_path / "b.npz", batch_size=50)
    torch.testing.assert_close(again.x, first.x, rtol=1e-5, atol=1e-6)
    assert torch.equal(again.noise, first.noise)
    beside = _pairs(parent, None)  # the default cache: named by the settings
    assert beside.path.parent == parent.parent and beside.path.name.startswith("reflow_pairs_")
    assert beside.path.is_file() and torch.equal(beside.noise, first.noise)
    # pair i is the shared generator's sample i: seed i, the parent's EMA weights, the pairs' sampler
    module = load_module(parent, "ema")
    expected = generate(module, range(96), shape=(2,), batch_size=96, sampler=samplers.build(**PAIRS))
    assert torch.equal(first.x, expected)

    def no_generation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached pairs should have been reused")

    monkeypatch.setattr(diffusionflow.reflow, "generate", no_generation)
    monkeypatch.setattr(diffusionflow.reflow, "load_module", no_generation)
    cached = _pairs(parent, tmp_path / "a.npz")
    assert torch.equal(cached.x, first.x) and torch.equal(cached.noise, first.noise)
    with pytest.raises(ConfigError, match=r"cache=.*a\.npz was made from another .*DPMSolverPP2M\(steps=12"):
        _pairs(parent, tmp_path / "a.npz", sampler={**PAIRS, "steps": 13})
    with pytest.raises(ConfigError, match="seed: cache '0', asked '1'"):
        _pairs(parent, tmp_path / "a.npz", seed=1)


@pytest.mark.parametrize(
    "sampler",
    [
        {"name": "ddpm", "steps": 8},
        {"name": "ddim", "steps": 8, "eta": 0.5},
        {"name": "edm", "steps": 8, "S_churn": 1.0},
        {"name": "sde", "steps": 8},
        {"name": "churn", "steps": 8},
        {"name": "dpmpp_2m_sde", "steps": 8},
    ],
)
def test_stochastic_samplers_are_refused_before_any_work(sampler, tmp_path):
    with pytest.raises(
        ConfigError, match=r"data\.train_dataset\.pairs\.sampler=.*fresh noise.*allowed: ddim \(eta=0\)"
    ):
        make_reflow_pairs(str(tmp_path / "never-read.ckpt"), sampler)


def test_a_missing_parent_is_refused_with_the_command(tmp_path):
    with pytest.raises(ConfigError, match=r"parent_ckpt=.*no such checkpoint file.*experiment=reflow_toy2d"):
        make_reflow_pairs(str(tmp_path / "missing.ckpt"), PAIRS)
    cfg = compose_train(["experiment=reflow_toy2d"], tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"parent_ckpt=null: .*`python -m diffusionflow\.train`"):
            train(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert not list(tmp_path.glob("**/*.npz"))


def test_a_batch_with_noise_trains_on_that_noise():
    sched = schedules.build("flow")
    module = DiffusionModule(
        MLP([2], width=16, depth=1),
        sched,
        predictions.build("flow"),
        weightings.build("flow"),
        proposals.build("uniform_t", schedule=sched),
        samplers.build("ddim", steps=2),
        optimizer=partial(torch.optim.Adam),
    )
    x, y, noise = torch.randn(8, 2), torch.zeros(8, dtype=torch.int64), torch.randn(8, 2)
    paired = module._loss(x, y, stream=0, eps=noise)
    drawn = module._loss(x, y, stream=0)
    torch.testing.assert_close(paired.logsnr, drawn.logsnr)  # λ as before
    expected = module.objective(partial(module.backbone, labels=None), x, logsnr=paired.logsnr, eps=noise)
    torch.testing.assert_close(paired.loss, expected.loss)
    assert not torch.allclose(paired.loss, drawn.loss)
