"""The main job: fast runs of every config, resume equality, checkpoints, DDP, bad configs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from diffusionflow.config import ConfigError
from diffusionflow.lightning.throughput import WALL_CLOCK_KEYS
from diffusionflow.paths import CONFIG_DIR
from diffusionflow.train import train
from train.conftest import compose_train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
NEEDS_DATA = {"cifar10", "imagenet64", "imagenet256"}
NEEDS_PARENT = {"reflow"}  # trains on a parent checkpoint's pairs: tests/lightning/test_reflow.py


def test_default_run_writes_everything(train_cfg, tmp_path):
    metrics = train(train_cfg())
    for name in ("metrics.json", "samples.png", "samples.npz", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("final/energy_distance", "final/sliced_w2", "final/log_density", "final/nfe", "train/loss"):
        assert key in saved and key in metrics
    assert saved["final/nfe"] == 7  # Heun, 4 steps: 2·4 − 1
    assert any(k.startswith("train_bins/eps_mse_") for k in saved)


@pytest.mark.parametrize(
    "experiment", [e for e in EXPERIMENTS if not any(d in e for d in NEEDS_DATA | NEEDS_PARENT)]
)
def test_experiments_fast_dev_run(train_cfg, experiment, cache_dir, monkeypatch):
    monkeypatch.setenv("DIFFUSIONFLOW_CACHE", str(cache_dir))  # the session's digits nets, trained once
    cfg = train_cfg([f"experiment={experiment}", "debug=fdr", "hydra.mode=RUN"])
    train(cfg)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if any(d in e for d in NEEDS_PARENT)])
def test_experiments_needing_a_parent_say_how_to_get_one(train_cfg, experiment, tmp_path):
    with pytest.raises(ConfigError, match=r"parent_ckpt=null.*python -m diffusionflow.train experiment="):
        train(train_cfg([f"experiment={experiment}", "debug=fdr", "hydra.mode=RUN"]))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if any(d in e for d in NEEDS_DATA)])
def test_experiments_needing_data_fail_with_the_folder_to_fill(train_cfg, experiment, tmp_path):
    one_device = ["trainer.num_nodes=1", "trainer.devices=1", "trainer.strategy=auto"]  # imagenet64: 4 nodes
    cfg = train_cfg([f"experiment={experiment}", "debug=fdr", *one_device])
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.precision = "32-true"
    folder = re.escape(str(tmp_path / "data"))  # data or FID reference; for latents, the SD VAE's weights
    vae = "data.vae.weights_path=None: VAE weights .* not found"
    with pytest.raises((FileNotFoundError, ConfigError), match=rf"{folder}|{vae}"):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["weighting=edm", "weighting.P_std=-1"], "P_std=-1"),
        (["schedule=cosine", "schedule.logsnr_min=5", "schedule.logsnr_max=-5"], "logsnr_min=5"),
        (["sampler.steps=-3"], "steps=-3"),
        (["model.guidance=3.0"], "model.guidance=3.0 needs class labels"),
        (["weighting=elbo", "sampler=ddim"], "prediction=eps cannot give"),
        (["sampler=ddim", "+sampler.stpes=4"], "unknown options \\['stpes'\\]"),
        (["proposal=mode", "proposal.s=9"], "s=9"),
        (["augment=edm"], r"model.augment \(.*AugmentPipe\): backbone diffusionflow.nn.MLP has no augment"),
        (["augment=edm", "data=digits", "backbone=dit_tiny"], "backbone diffusionflow.nn.DiT has no augment"),
        (
            ["experiment=imagenet256_sit_flow", "data.vae.weights_path=/no/vae.safetensors"],
            "data.vae.weights_path=/no/vae.safetensors: VAE weights file /no/vae.safetensors does not exist; "
            ".*prefetch",
        ),
    ],
)
def test_bad_config_fails_before_training(train_cfg, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train(train_cfg(overrides))
    assert not (tmp_path / "checkpoints").exists()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return ckpt["current_model_state"] | {f"ema.{k}": v for k, v in ckpt["state_dict"].items()}


def test_resume_gives_the_same_weights(train_cfg, tmp_path):
    """Stop after 2 epochs and resume to 4, against 4 straight epochs (CPU, fixed seed)."""
    base = ["data.train_dataset.n=256", "trainer.max_steps=-1", "proposal=adaptive"]
    train(train_cfg([*base, "trainer.max_epochs=4"]))
    straight = _weights(tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "checkpoints" / "last.ckpt").rename(tmp_path / "straight.ckpt")
    train(train_cfg([*base, "trainer.max_epochs=2"]))
    train(train_cfg([*base, "trainer.max_epochs=4", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]))
    resumed = _weights(tmp_path / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert isinstance(ckpt["hyper_parameters"]["config"], dict)
    assert "adaptive_proposal" in ckpt


def test_checkpoint_write_is_atomic(train_cfg, tmp_path, monkeypatch):
    train(train_cfg())
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    from diffusionflow.lightning import checkpoint_io

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_io.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint_io.AtomicCheckpointIO().save_checkpoint({"x": 1}, last)
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_ddp_sim_two_processes(train_cfg, tmp_path):
    metrics = train(train_cfg(["trainer=ddp_sim", "data.batch_size=64"]))
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert metrics["final/nfe"] == 7


def test_toy_metrics_during_training(tmp_path):
    """``callbacks.final_eval.every_n_steps``: toy/* metrics at steps 2, 4, 6 in the CSV, measured with
    the EMA weights after that step's update — at the last step they are the final/ values — and the
    run itself is unchanged (the same final metrics as without them)."""
    runs = {}
    for every in (None, 2):
        out = tmp_path / str(every)
        extra = [] if every is None else [f"callbacks.final_eval.every_n_steps={every}"]
        runs[every] = train(compose_train(extra, out))
    same = [{k: v for k, v in runs[e].items() if not k.startswith(WALL_CLOCK_KEYS)} for e in (None, 2)]
    assert same[0] == pytest.approx(same[1], rel=0, abs=0)
    with (tmp_path / "2" / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("toy/sliced_w2")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for key in ("sliced_w2", "energy_distance", "log_density"):
        assert float(rows[-1][f"toy/{key}"]) == pytest.approx(runs[2][f"final/{key}"], rel=1e-6)
    assert "toy/sliced_w2" not in (tmp_path / "None" / "csv" / "metrics.csv").read_text()
