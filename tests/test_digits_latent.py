"""The latent pipeline on the embedded digits: the digits VAE (cached, seeded, rebuilt when corrupted, its
reconstruction error), ``experiment=digits_latent`` end to end (encode → train → sample → decode →
fd_digits), and a latent/VAE mismatch refused before any work."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from diffusionflow.data.digits import Digits
from diffusionflow.data.latents import LatentDataset
from diffusionflow.errors import ConfigError
from diffusionflow.evaluate import main as evaluate_main
from diffusionflow.metrics import digits_vae as dv
from diffusionflow.metrics.cache import checksum_path
from diffusionflow.nn.vae import LatentCodec
from diffusionflow.sample import sample
from diffusionflow.train import train
from helpers import compose_sample
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae(cache_dir) -> dv.DigitsVAE:
    """The full digits VAE, trained once per session in the shared cache (the end-to-end run reads it)."""
    return dv.digits_vae(cache_dir / "digits-vae-seed0.pt")


def test_vae_cache_round_trip_and_rebuild(tmp_path, monkeypatch, caplog):
    """A miss trains and writes the weights, their SHA-256 and a report; a hit trains nothing; a corrupted
    weights file or report is retrained, with a warning, into the same bytes (seeded, deterministic)."""
    path = tmp_path / "vae.pt"
    first = dv.digits_vae(path, epochs=1)
    assert (
        path.is_file() and checksum_path(path).is_file() and first.sha256 in checksum_path(path).read_text()
    )
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == first.sha256
    trainings = []
    real_train = dv._fit
    monkeypatch.setattr(dv, "_fit", lambda *a: trainings.append(a) or real_train(*a))
    assert dv.digits_vae(path, epochs=1).sha256 == first.sha256 and trainings == []

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = dv.digits_vae(path, epochs=1)
    assert "does not match its SHA-256" in caplog.text and len(trainings) == 1
    assert rebuilt.sha256 == first.sha256 and rebuilt.test_mse == first.test_mse

    path.with_suffix(".json").write_text("{}")  # a report that no longer matches its checksum
    assert dv.digits_vae(path, epochs=1).sha256 == first.sha256 and len(trainings) == 2
    # another request (more epochs) is not served by this file: it is retrained
    assert dv._load(path, seed=0, epochs=2) is None


@pytest.mark.slow  # the full digits VAE, trained once per session (about a minute on 2 busy cores)
def test_reconstruction_error_bound(vae):
    """Test-split reconstructions D(m(x)) at PSNR ≥ 24 dB (RMS error ≤ 0.126, 6.3% of the range [−1, 1])
    and with ≤ 1/10 of the squared error of the best constant guess (the mean test image); the codec
    (normalised latents, the path training and sampling use) reconstructs exactly as the report says."""
    x = Digits(split="test", resolution=16).x
    assert vae.test_psnr > 24.0 and vae.test_mse < 4 * 10 ** (-2.4)
    assert vae.test_mse < 0.1 * float((x - x.mean(0)).square().mean())
    dataset = dv.digits_latents("train", vae.weights_path)
    codec = LatentCodec.from_meta(vae.autoencoder(), dataset.meta)
    with torch.no_grad():
        z = codec.encode(x)
        mse = float((codec.decode(z) - x).double().square().mean())
    assert math.isclose(mse, vae.test_mse, rel_tol=1e-4)
    assert 10 * math.log10(4 / mse) == pytest.approx(vae.test_psnr, rel=1e-4)
    # the training latents, as the DataModule reads them: per-channel mean 0, std 0.5 (EDM2's normalisation)
    latents = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert latents.shape == (1500, 4, 4, 4)
    assert torch.allclose(latents.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(latents.std((0, 2, 3), correction=0), torch.full((4,), 0.5), atol=1e-5)


@pytest.mark.slow  # the full digits VAE, trained once per session (about a minute on 2 busy cores)
def test_digits_latent_end_to_end(vae, cache_dir, tmp_path, monkeypatch):
    """A short digits_latent run: the latents are encoded and trained on, and every sample goes through
    the VAE's decoder before fd_digits, the mosaic and samples.npz; then ``evaluate samplers`` and
    ``sample`` on its checkpoint decode too."""
    calls: list[tuple[int, ...]] = []
    decode = LatentCodec.decode

    def spy(self: LatentCodec, latents: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(latents.shape))
        return decode(self, latents)

    monkeypatch.setattr(LatentCodec, "decode", spy)
    cfg = compose_train(
        [
            "experiment=digits_latent",
            f"data.vae.weights_path={vae.weights_path}",
            f"callbacks.fd_digits.cache_dir={cache_dir}",
            "callbacks.fd_digits.num_samples=64",
            "callbacks.fd_digits.batch_size=32",
            "callbacks.final_eval.num_samples=40",
        ],
        tmp_path,
    )
    try:
        metrics = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    key = "fd_digits/64_heun7_ema"
    assert math.isfinite(metrics[key]) and metrics[key] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())[key] == metrics[key]
    assert all(shape[1:] == (4, 4, 4) for shape in calls)
    # 64 generated + 40 final + the 1500 reference latents, each decoded once
    assert sum(shape[0] for shape in calls) == 64 + 40 + 1500
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["samples"].shape == (40, 1, 16, 16) and npz["latents"].shape == (40, 4, 4, 4)
        assert npz["samples"].min() >= -1 and npz["samples"].max() <= 1
    assert (tmp_path / "samples_mosaic.png").is_file() and (tmp_path / "samples.png").is_file()
    rows = (tmp_path / "eval" / "fid.csv").read_text()
    assert "decoded_by" in rows and f"digits:{vae.sha256[:16]}:edm2" in rows

    # the checkpoint outside training: `evaluate samplers` decodes as the callback did (same value), and
    # `sample` writes decoded images
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    calls.clear()
    grid = evaluate_main(
        [
            *("samplers", "--ckpt", str(ckpt), "--out", str(tmp_path / "grid"), "--samplers", "heun:4"),
            *("--metric", "fd_digits", "--num-samples", "64", "--batch-size", "16"),
            *("--cache-dir", str(cache_dir)),
        ]
    )
    assert [r.key for r in grid] == [key] and grid[0].value == pytest.approx(metrics[key], rel=1e-6)
    assert sum(shape[0] for shape in calls) == 64  # the reference statistics came from the cache
    sample(compose_sample([f"out_dir={tmp_path / 'sampled'}", f"ckpt_path={ckpt}", "num_samples=6"]))
    with np.load(tmp_path / "sampled" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 16, 16, 1) and npz["arr_0"].dtype == np.uint8
    assert sum(shape[0] for shape in calls) == 64 + 6


def test_other_vae_config_is_refused_before_any_work(tmp_path):
    """Digits latents with data.vae.config of another autoencoder: a ConfigError naming the key, before the
    VAE is trained, anything is encoded or a step is taken."""
    weights = tmp_path / "never-written.pt"  # the digits VAE's: trained there if the refusal came late
    sd_weights = tmp_path / "sd-vae-ft-ema.safetensors"  # present, so validation passes to the data check
    sd_weights.touch()
    cfg = compose_train(
        [
            *(
                "experiment=digits_latent",
                "data.vae.config=sd-vae-ft-ema",
                f"data.vae.weights_path={sd_weights}",
            ),
            *(f"data.{split}_dataset.weights_path={weights}" for split in ("train", "val")),
        ],
        tmp_path,
    )
    try:
        with pytest.raises(ConfigError, match=r"data.vae.config='sd-vae-ft-ema'.*vae='digits'"):
            train(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert not weights.exists() and not list(tmp_path.glob("digits-latents-*"))
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))


@pytest.mark.slow  # the full digits VAE, trained once per session (about a minute on 2 busy cores)
def test_latent_folder_of_another_vae_is_refused(vae):
    """The cached latent folder read as if encoded by another autoencoder: LatentDataset refuses it."""
    folder = dv.digits_latents("train", vae.weights_path).root
    with pytest.raises(ConfigError, match="encoded with vae='digits'"):
        LatentDataset(folder, expect_vae="sd-vae-ft-ema")
