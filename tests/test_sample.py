"""The sampling entry point: checkpoints (EMA / raw, any sampler), the exact oracle, noise, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusionflow.checkpoint import build_module, load_module
from diffusionflow.config import ConfigError
from diffusionflow.core.samplers import Heun, seeded_noise
from diffusionflow.data.toy2d import mixture
from diffusionflow.lightning import final_eval
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.metrics.toy import energy_distance
from diffusionflow.paths import CONFIG_DIR
from diffusionflow.sample import sample
from diffusionflow.train import train
from train.conftest import compose_train

N = 64


def compose_sample(overrides: list[str]) -> DictConfig:
    """The composed ``sample`` config, with Hydra's config set as the entry point has it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("sample", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run(out_dir: Path, *overrides: str) -> dict[str, Any]:
    """Samples into ``out_dir``; returns the arrays of samples.npz."""
    sample(compose_sample([f"out_dir={out_dir}", f"num_samples={N}", *overrides]))
    with np.load(out_dir / "samples.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, DiffusionModule]:
    """A few steps of the default toy run (EMA on): its last.ckpt and the module as training left it."""
    run_dir = tmp_path_factory.mktemp("train")
    modules: list[DiffusionModule] = []
    original = final_eval.final_evaluation

    def capture(module: DiffusionModule, *args: Any, **kwargs: Any) -> dict[str, float]:
        modules.append(module)
        return original(module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(final_eval, "final_evaluation", capture)
        train(compose_train([], run_dir))
    GlobalHydra.instance().clear()
    return run_dir / "checkpoints" / "last.ckpt", modules[0]


@pytest.fixture(scope="module")
def ckpt(trained) -> Path:
    return trained[0]


@pytest.mark.parametrize(
    ("sampler", "steps", "nfe"),
    [("heun", 5, 9), ("euler", 5, 5), ("dpmpp_2m", 6, 6), ("ddpm", 3, 3), ("edm", 4, 7)],
)
def test_checkpoint_samples_with_the_sampler_asked_for(ckpt, tmp_path, sampler, steps, nfe):
    out = run(tmp_path, f"ckpt_path={ckpt}", f"sampler={sampler}", f"sampler.steps={steps}")
    assert out["samples"].shape == (N, 2) and np.isfinite(out["samples"]).all()
    assert (out["nfe"], out["sampler"], out["steps"], out["seed"]) == (nfe, sampler, steps, 0)
    assert (out["weights"], out["source"]) == ("ema", f"checkpoint {ckpt}")
    assert "labels" not in out
    assert (tmp_path / "samples.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["nfe"] == nfe
    assert {"energy_distance", "energy_distance_floor", "sliced_w2", "log_density"} <= metrics.keys()


def test_raw_weights_are_the_checkpoints_current_model_state(ckpt, tmp_path):
    ema = run(tmp_path / "ema", f"ckpt_path={ckpt}", "weights=ema", "sampler.steps=4")["samples"]
    raw = run(tmp_path / "raw", f"ckpt_path={ckpt}", "weights=raw", "sampler.steps=4")["samples"]
    assert not np.allclose(ema, raw, atol=1e-4)
    by_hand = load_module(ckpt, "ema")
    by_hand.load_state_dict(torch.load(ckpt, weights_only=True)["current_model_state"])
    noise, _ = seeded_noise(range(N), (2,))
    expected = by_hand.generate(noise.float(), sampler=Heun(steps=4)).numpy()
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-6)


def test_samples_depend_on_the_seed_only(ckpt, tmp_path):
    """A stochastic sampler: the same seed gives the same samples whatever the batch size."""
    args = (f"ckpt_path={ckpt}", "sampler=ddpm", "sampler.steps=8")
    first = run(tmp_path / "a", *args)["samples"]
    np.testing.assert_array_equal(first, run(tmp_path / "b", *args)["samples"])
    np.testing.assert_allclose(first, run(tmp_path / "c", *args, "batch_size=7")["samples"], atol=1e-6)
    assert not np.allclose(first, run(tmp_path / "d", *args, "seed=1")["samples"], atol=1e-2)


def test_noise_is_per_sample(ckpt, tmp_path):
    """Sample i has seed ``seed + i``: a larger run extends a smaller one, also for stochastic samplers."""
    first, _ = seeded_noise(range(3, 13), (2,))
    assert torch.equal(first, seeded_noise(range(3, 33), (2,))[0][:10])
    args = (f"ckpt_path={ckpt}", "sampler=ddpm", "sampler.steps=8")
    small = run(tmp_path / "small", *args, "num_samples=10")["samples"]
    large = run(tmp_path / "large", *args, "batch_size=5")["samples"]
    np.testing.assert_allclose(small, large[:10], atol=1e-6)


@pytest.mark.parametrize(("sampler", "steps", "accurate"), [("heun", 30, True), ("euler", 2, False)])
def test_oracle_samples_the_mixture(tmp_path, sampler, steps, accurate):
    """Heun on the exact denoiser at 59 NFE is as close to the law as exact samples are to each other."""
    n = 1024
    out = run(tmp_path, "oracle=blog", f"sampler={sampler}", f"sampler.steps={steps}", f"num_samples={n}")
    assert out["samples"].dtype == np.float64 and out["weights"] == "exact" and out["source"] == "oracle blog"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    exact = mixture("blog").sample(n, torch.Generator().manual_seed(99))
    distance = energy_distance(torch.from_numpy(out["samples"]), exact)
    floor = metrics["energy_distance_floor"]
    assert (distance < 3 * floor) == accurate
    assert (metrics["energy_distance"] < 3 * floor) == accurate


def test_load_module_gives_the_trained_ema_denoiser(trained):
    path, module = trained
    rebuilt, raw = load_module(path, "ema"), load_module(path, "raw")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    for t in (0.1, 0.5, 0.9):
        t = torch.tensor(t, dtype=torch.float64)
        expected = module.denoiser()(z, t)
        torch.testing.assert_close(rebuilt.denoiser()(z, t), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(raw.denoiser()(z, t), expected, atol=1e-4)
    assert not rebuilt.training and rebuilt.hparams["config"]["data"]["shape"] == [2]


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory) -> Path:
    """A class-conditional UNet on 8×8 digits with random weights (its zero-initialised layers too, so
    that labels matter), saved as training saves without EMA."""
    path = tmp_path_factory.mktemp("cond") / "cond.ckpt"
    cfg = compose_train(["data=digits", "backbone=unet_tiny"], path.parent)
    module = build_module(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    GlobalHydra.instance().clear()
    return path


def test_conditional_checkpoint_cycles_labels_and_guides(conditional_ckpt, tmp_path):
    args = (f"ckpt_path={conditional_ckpt}", "weights=raw", "sampler.steps=3", "num_samples=12")
    plain = run(tmp_path / "plain", *args)
    assert plain["samples"].shape == (12, 1, 8, 8)
    np.testing.assert_array_equal(plain["labels"], np.arange(12) % 10)
    assert plain["guidance"] == 1.0 and plain["nfe"] == 5
    assert (tmp_path / "plain" / "samples.png").exists()
    assert not (tmp_path / "plain" / "metrics.json").exists()
    guided = run(tmp_path / "guided", *args, "guidance=3.0", "labels=[0,7]")
    np.testing.assert_array_equal(guided["labels"], [0, 7] * 6)
    assert guided["guidance"] == 3.0 and guided["nfe"] == 5
    assert not np.allclose(guided["samples"][0], plain["samples"][0], atol=1e-4)


@pytest.fixture(scope="module")
def checkpoints(ckpt, conditional_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The checkpoints of the error cases: the toy run's, the conditional one, and the toy run's without
    its EMA weights or without its config."""
    no_ema, no_config = (torch.load(ckpt, weights_only=True) for _ in range(2))
    del no_ema["current_model_state"]
    del no_config["hyper_parameters"]["config"]
    paths = {"ckpt": ckpt, "cond": conditional_ckpt}
    folder = tmp_path_factory.mktemp("broken")
    for name, data in (("no_ema", no_ema), ("no_config", no_config)):
        paths[name] = folder / f"{name}.ckpt"
        torch.save(data, paths[name])
    return paths


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ([], "ckpt_path=None and oracle=None"),
        (["ckpt_path={ckpt}", "oracle=blog"], "ckpt_path=.*last.ckpt and oracle=blog"),
        (["oracle=moons"], "oracle='moons' has no exact denoiser; allowed: \\['blog', 'eight', 'grid'\\]"),
        (["oracle=blog", "num_samples=0"], "num_samples=0: expected an integer >= 1"),
        (["oracle=blog", "num_samples=abc"], "num_samples='abc': expected an integer >= 1"),
        (["oracle=blog", "batch_size=0"], "batch_size=0: expected an integer >= 1"),
        (["oracle=blog", "batch_size=2.5"], "batch_size=2.5: expected an integer >= 1"),
        (["oracle=blog", "seed=-1"], "seed=-1: expected an integer >= 0"),
        (["oracle=blog", "seed=true"], "seed=True: expected an integer >= 0"),
        (["oracle=blog", "weights=best"], "weights='best' is unknown; allowed: \\['ema', 'raw'\\]"),
        (["oracle=blog", "guidance=2.0"], "guidance=2.0 needs a class-conditional model"),
        (["ckpt_path={ckpt}", "guidance=2.0"], "guidance=2.0 needs a class-conditional model"),
        (["ckpt_path={ckpt}", "labels=[1]"], "labels=\\[1\\] needs a class-conditional model"),
        (["ckpt_path={cond}", "weights=raw", "labels=[10]"], "labels=\\[10\\] must be class indices"),
        (["oracle=blog", "sampler=ddim", "+sampler.stpes=4"], "unknown options \\['stpes'\\]"),
        (["ckpt_path={ckpt}", "sampler.steps=0"], "sampler.steps=0: expected an integer >= 1"),
        (["oracle=blog", "sampler.steps=1.5"], "sampler.steps=1.5: expected an integer >= 1"),
        (["oracle=blog", "guidance=abc"], "guidance='abc': expected a number or null"),
        (["ckpt_path={ckpt}", "schedule=cosine"], "schedule=cosine: schedule is for oracle= only"),
        (["oracle=blog", "schedule=canonical"], "schedule=canonical means a weighting's schedule"),
        (["ckpt_path={ckpt}", "device=gpu0"], "device='gpu0'"),
        (["ckpt_path={no_ema}"], "weights=ema, but .*no EMA weights.*weights=raw"),
        (["ckpt_path={no_config}", "weights=raw"], "ckpt_path=.* stores no run config"),
    ],
)
def test_bad_input_fails_before_sampling(checkpoints, tmp_path, overrides, match):
    out_dir = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        sample(compose_sample([f"out_dir={out_dir}", *(o.format(**checkpoints) for o in overrides)]))
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("device", "count", "match"),
    [
        ("cuda", 0, r"^device=cuda: no CUDA device is available; allowed: cpu$"),
        ("cuda:0", 0, r"^device=cuda:0: no CUDA device is available; allowed: cpu$"),
        ("cuda:3", 1, r"^device=cuda:3: this machine has 1 CUDA device; allowed: cpu, cuda, cuda:0$"),
    ],
)
def test_a_device_that_is_not_there_fails_before_loading(ckpt, tmp_path, monkeypatch, device, count, match):
    """Before: ``device=cuda`` without a GPU reached ``torch.load(map_location=cuda)`` and its traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    loaded = []
    monkeypatch.setattr("diffusionflow.sample.load_module", lambda *a, **k: loaded.append(a))
    out_dir = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        sample(compose_sample([f"out_dir={out_dir}", f"ckpt_path={ckpt}", f"device={device}"]))
    assert not loaded and not out_dir.exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=f"ckpt_path={missing}"):
        sample(compose_sample([f"out_dir={tmp_path / 'out'}", f"ckpt_path={missing}"]))


def test_command_line_writes_to_the_run_dir(tmp_path):
    cmd = [sys.executable, "-m", "diffusionflow.sample", "oracle=eight", "sampler=dpmpp_2m"]
    result = subprocess.run(
        [*cmd, "sampler.steps=10", "num_samples=32", f"paths.log_dir={tmp_path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    (run_dir,) = (tmp_path / "sample" / "runs").iterdir()
    for name in ("samples.npz", "samples.png", "metrics.json"):
        assert (run_dir / name).exists(), name
    summary = f"32 samples from oracle eight (exact) with dpmpp_2m, 10 steps, NFE 10 -> {run_dir}"
    assert summary in result.stdout
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").sampler.steps == 10
