"""One generator: the same seeds give the same samples through every caller (final evaluation, the FID
callback's generation, reflow pairs, ``sample``), and the generator's own rules (seeds, labels, mode)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from diffusionflow.checkpoint import build_module, load_module
from diffusionflow.core.samplers import seeded_noise
from diffusionflow.data.reflow_pairs import ReflowPairs
from diffusionflow.lightning.final_eval import generate_fixed
from diffusionflow.metrics.extractors import to_uint8
from diffusionflow.metrics.fid import generate_features
from diffusionflow.metrics.generate import default_labels, generate, generate_batches
from diffusionflow.paths import CONFIG_DIR
from diffusionflow.reflow import make_reflow_pairs
from diffusionflow.sample import sample
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

N, SHAPE = 12, (1, 8, 8)
HEUN = {"name": "heun", "steps": 2, "grid": "edm", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0}


@pytest.fixture(scope="module")
def conditional(tmp_path_factory) -> Path:
    """A class-conditional UNet on 8×8 digits with random weights (labels matter), Heun with 2 steps,
    saved as training saves without EMA."""
    path = tmp_path_factory.mktemp("cond") / "cond.ckpt"
    cfg = compose_train(["data=digits", "backbone=unet_tiny", "sampler.steps=2"], path.parent)
    GlobalHydra.instance().clear()
    module = build_module(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


class Identity(torch.nn.Module):
    """A feature "extractor" of 4 features: enough for the statistics; the kept images are compared."""

    name, feature_dim = "identity", 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :4].double()


def _sample(ckpt: Path, out: Path) -> np.ndarray:
    GlobalHydra.instance().clear()
    overrides = [f"ckpt_path={ckpt}", "weights=raw", f"num_samples={N}", f"batch_size={N}", f"out_dir={out}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(
            "sample", overrides=[*overrides, "sampler=heun", "sampler.steps=2"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    try:
        sample(cfg)
    finally:
        GlobalHydra.instance().clear()
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]  # images: uint8 NHWC, EDM's rounding


def test_every_caller_gives_the_same_samples(conditional, tmp_path):
    module = load_module(conditional, "raw")
    reference = generate(module, range(N), shape=SHAPE, batch_size=N)
    assert reference.shape == (N, *SHAPE)
    final, labels = generate_fixed(module, SimpleNamespace(shape=SHAPE), N, seed=0)
    assert torch.equal(final, reference) and torch.equal(labels, torch.arange(N) % 10)
    fid = generate_features(module, module.sampler, range(N), Identity(), shape=SHAPE, batch_size=N, keep=N)
    assert torch.equal(fid.images, to_uint8(reference)) and fid.indices == list(range(N))
    cache = str(tmp_path / "p.npz")
    made = make_reflow_pairs(str(conditional), HEUN, num_pairs=N, weights="raw", cache=cache)
    pairs = ReflowPairs(str(made))
    assert torch.equal(pairs.x, reference) and torch.equal(pairs.y, torch.arange(N) % 10)
    assert torch.equal(pairs.noise, seeded_noise(range(N), SHAPE, torch.float32)[0])
    written = to_uint8(reference).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(_sample(conditional, tmp_path / "sample"), written)


def test_seeds_labels_and_batches(conditional):
    """Sample i: seed seed_offset + i, label i mod K; a shard of the indices gives those rows."""
    module = load_module(conditional, "raw")
    together = generate(module, range(10), shape=SHAPE, batch_size=10, seed_offset=3)
    part = generate(module, range(6, 10), shape=SHAPE, batch_size=3, seed_offset=3)
    # other batches: equal up to the network's batch-size-dependent rounding (amplified by random weights)
    torch.testing.assert_close(part, together[6:], rtol=1e-2, atol=1e-2)
    shard = generate(module, range(6, 10), shape=SHAPE, batch_size=4, seed_offset=3)
    labels = torch.tensor([6, 7, 8, 9])
    explicit = generate(module, range(6, 10), shape=SHAPE, batch_size=4, seed_offset=3, labels=labels)
    assert torch.equal(explicit, shard)  # the default labels are i mod 10
    other = generate(module, range(6, 10), shape=SHAPE, batch_size=4, seed_offset=3, labels=labels * 0)
    assert not torch.allclose(other, shard, atol=0.1)
    assert default_labels(range(8, 12), 10).tolist() == [8, 9, 0, 1]
    assert default_labels(range(3), 0) is None


def test_the_models_mode_is_restored(conditional):
    module = load_module(conditional, "raw").train()
    seen = []
    denoiser = module.denoiser

    def spy(labels=None, guidance=None):
        seen.append((module.training, torch.is_grad_enabled()))
        return denoiser(labels, guidance)

    module.denoiser = spy
    for _ in generate_batches(module, range(4), shape=SHAPE, batch_size=2):
        assert module.training  # restored after each batch
    assert seen == [(False, False), (False, False)]
    assert module.training and torch.is_grad_enabled()
    with pytest.raises(ValueError, match="2 labels for 4 samples"):
        generate(module, range(4), shape=SHAPE, batch_size=2, labels=torch.zeros(2, dtype=torch.int64))
