"""DiT-B/2 and DiT-XL/2 (= SiT-XL/2) on ImageNet-256 latents: parameter counts against the papers and a
closed form, the backbone configs, and the ImageNet-256 latent experiments and sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffusionflow.config import build_components, resolve
from diffusionflow.metrics.fid import reference_moments
from diffusionflow.metrics.generate import nfe_of
from diffusionflow.nn import DIT_PRESETS, DiT
from diffusionflow.nn.dit import NOISE_FEATURES
from diffusionflow.nn.vae import EDM2_LATENT_STD
from diffusionflow.paths import CONFIG_DIR
from helpers import MeanStd
from train.conftest import compose_train

LATENT = (4, 32, 32)  # ImageNet-256 through the SD VAE (/8, 4 channels)
CLASSES = 1000


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_of(preset: str) -> int:
    with torch.device("meta"):
        return count(DiT.preset(preset, LATENT, num_classes=CLASSES))


def closed_form(preset: str, out_channels: int = LATENT[0], pos_table: bool = False) -> int:
    """Parameters of DiT from its architecture (Peebles & Xie 2023, §3.2): patchify, timestep MLP, label
    table with a null row, ``depth`` adaLN-Zero blocks (qkv, projection, MLP, 6·width modulation), final
    adaLN layer; optionally the paper's learned-variance head and frozen position-embedding parameter."""
    kw = DIT_PRESETS[preset]
    p, w, depth = kw["patch_size"], kw["width"], kw["depth"]
    hidden = int(w * kw["mlp_ratio"])
    block = (3 * w * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w) + (6 * w * w + 6 * w)
    patchify = LATENT[0] * p * p * w + w
    noise_mlp = NOISE_FEATURES * w + w + w * w + w
    labels = (CLASSES + 1) * w
    final = (2 * w * w + 2 * w) + (w * p * p * out_channels + p * p * out_channels)
    tokens = (LATENT[1] // p) * (LATENT[2] // p)
    return patchify + noise_mlp + labels + depth * block + final + (tokens * w if pos_table else 0)


@pytest.mark.parametrize(("preset", "paper"), [("dit_b2", 130e6), ("dit_xl2", 675e6)])
def test_latent_presets_match_the_papers(preset, paper):
    with torch.device("meta"):  # no memory, no initialisation: XL/2 counts in milliseconds
        model = DiT.preset(preset, LATENT, num_classes=CLASSES)
    ours = count(model)
    assert ours == closed_form(preset)
    assert abs(ours / paper - 1) < 0.005  # DiT: B/2 130M, XL/2 675M
    with_variance = closed_form(preset, out_channels=2 * LATENT[0], pos_table=True)
    assert with_variance - ours < 0.002 * ours  # the paper's extra head and frozen table: negligible


def test_xl2_with_the_papers_head_is_the_reference_count():
    """DiT's released DiT-XL/2 (learned σ: 8 output channels; frozen position table as a parameter) has
    675,129,632 parameters (the count its train.py prints; SiT-XL/2 the same)."""
    assert closed_form("dit_xl2", out_channels=8, pos_table=True) == 675_129_632


def test_xl2_is_sit_xl2():
    """SiT-XL/2 (Ma et al. 2024; willisma/SiT models.py): depth 28, hidden size 1152, 16 heads, patch 2."""
    assert DIT_PRESETS["dit_xl2"] == dict(patch_size=2, depth=28, width=1152, num_heads=16, mlp_ratio=4.0)


@pytest.mark.parametrize("preset", ["dit_tiny", "dit_xl2"])
def test_backbone_config_matches_preset(preset):
    backbone = OmegaConf.load(CONFIG_DIR / "backbone" / f"{preset}.yaml")
    cfg = OmegaConf.create({"data": {"shape": list(LATENT), "num_classes": CLASSES}, "backbone": backbone})
    with torch.device("meta"):
        model = instantiate(cfg.backbone)
    assert isinstance(model, DiT) and model.shape == LATENT and model.num_classes == CLASSES
    written = OmegaConf.to_container(backbone)
    assert {k: v for k, v in written.items() if k not in ("_target_", "shape", "num_classes")} == DIT_PRESETS[
        preset
    ]


# ---- the ImageNet-256 latent experiments ---------------------------------------------------------------
def _compose(overrides: list[str], tmp_path: Path) -> DictConfig:
    try:
        return resolve(compose_train(overrides, tmp_path, fast=False))
    finally:
        GlobalHydra.instance().clear()


def _latent_model(cfg: DictConfig) -> int:
    assert list(cfg.data.shape) == list(LATENT) and cfg.data.num_classes == CLASSES
    with torch.device("meta"):
        return count(instantiate(cfg.backbone))


def _nfe(cfg: DictConfig) -> int:
    components = build_components(cfg)
    return nfe_of(components.sampler, components.schedule)


def _dit_recipe(cfg: DictConfig) -> None:
    """DiT's training recipe (Peebles & Xie 2023, "Experimental setup"), which SiT keeps: AdamW 1e-4
    without weight decay, batch 256, EMA 0.9999 per step, label dropout 0.1, guidance 1.5 for FID, 7M
    steps."""
    opt = cfg.model.optimizer
    assert opt._target_ == "torch.optim.AdamW" and opt.lr == 1e-4 and opt.weight_decay == 0
    assert cfg.data.batch_size == 256 and cfg.model.lr_scheduler is None
    assert cfg.callbacks.ema.decay == 0.9999 and cfg.callbacks.ema.half_life_images is None
    assert cfg.model.label_dropout == 0.1 and cfg.model.guidance == 1.5 and cfg.trainer.max_steps == 7_000_000
    assert cfg.data.vae.config == "sd-vae-ft-ema"
    assert cfg.callbacks.fid.reference.endswith("VIRTUAL_imagenet256_labeled.npz")


def test_imagenet256_sit_flow_is_sits_setup(tmp_path):
    cfg = _compose(["experiment=imagenet256_sit_flow"], tmp_path)
    assert _latent_model(cfg) == count_of("dit_xl2")
    _dit_recipe(cfg)
    # the linear interpolant with velocity prediction and uniform t (SiT's best setup)
    assert cfg.schedule._target_.endswith("schedules.Flow") and cfg.prediction._target_.endswith("Flow")
    assert cfg.proposal._target_.endswith("UniformT") and cfg.data.vae.normalisation == "sd"
    assert 245 <= _nfe(cfg) <= 250  # SiT's released XL/2 evaluation: Heun, 250 NFE


def test_imagenet256_dit_edm_is_edm_on_edm2_latents(tmp_path):
    cfg = _compose(["experiment=imagenet256_dit_edm"], tmp_path)
    assert _latent_model(cfg) == count_of("dit_xl2")
    _dit_recipe(cfg)
    assert cfg.prediction._target_.endswith("predictions.EDM") and cfg.proposal._target_.endswith("LogNormal")
    # EDM's σ_data is the standard deviation EDM2's latent normalisation gives the data
    assert cfg.data.vae.normalisation == "edm2" and cfg.prediction.sigma_data == EDM2_LATENT_STD
    assert _nfe(cfg) == 63  # EDM2's latent sampler: Heun, 32 steps


def test_weightings_imagenet256_sweep(tmp_path):
    """The six weightings × 3 seeds of weightings_cifar10, each with its paper's setup, at B/2 scale."""
    cfg = _compose(["sweep=weightings_imagenet256"], tmp_path)
    cifar = _compose(["sweep=weightings_cifar10"], tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params == cifar.hydra.sweeper.params
    for weighting in cfg.hydra.sweeper.params.weighting.split(","):
        job = _compose(["sweep=weightings_imagenet256", f"weighting={weighting}"], tmp_path)
        assert _latent_model(job) == count_of("dit_b2")
        assert job.weighting._target_ == _compose([f"weighting={weighting}"], tmp_path).weighting._target_


def test_adm_reference_batch_is_read(tmp_path):
    """ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``) hold the images (``arr_0``), the pool3
    statistics ``mu``, ``sigma`` and sFID's ``mu_s``, ``sigma_s``: the reference is ``mu`` and ``sigma``."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(MeanStd.feature_dim, MeanStd.feature_dim))
    mu, sigma = rng.normal(size=MeanStd.feature_dim), a @ a.T
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=rng.normal(size=3), sigma_s=np.eye(3))
    got_mu, got_sigma, key = reference_moments(str(path), None, MeanStd(), tmp_path)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert json.loads(key) == {"file": str(path)}
