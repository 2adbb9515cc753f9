"""``python -m diffusionflow.encode``: latents equal to the VAE's posterior means, a killed run resumed to
the same bytes (encoding only what was missing), two processes equal one, bad input refused first."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from diffusionflow import encode
from diffusionflow.data.latents import LatentDataset, read_meta
from diffusionflow.data.transforms import adm_center_crop, to_unit_range
from diffusionflow.nn import vae
from diffusionflow.nn.vae import load_autoencoder
from vae_helpers import TINY, TINY_VAE, register_tiny, save_tiny_weights

MODES = {3: "L", 8: "RGBA", 12: "P"}  # the images stored in another mode than RGB
FILES = ("latents.npy", "labels.npy", "meta.json")
ENCODE_BLOCK = encode.encode_block


@pytest.fixture
def weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(vae.VAE_CONFIGS, TINY, TINY_VAE)
    return save_tiny_weights(tmp_path / "tiny.safetensors")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """14 images of assorted sizes in two class folders (n02 before n01 on disk order: labels sort)."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(14):
        folder = root / ("n02" if i < 7 else "n01")
        folder.mkdir(parents=True, exist_ok=True)
        height, width = rng.integers(16, 48, size=2)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = image.convert(MODES[i]) if i in MODES else image
        image.save(folder / f"{i:02d}.png")
    return root


def _argv(images: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        *("--input", str(images), "--out", str(out), "--vae", TINY, "--vae-weights", str(weights)),
        *("--resolution", "16", "--batch-size", "4", "--device", "cpu", "--workers", "0", *extra),
    ]


def _count_blocks(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[int]:
    """Counts the forward passes of encode (one per block); the ``fail_after + 1``-th raises."""
    calls: list[int] = []

    def counted(autoencoder, x):
        if fail_after is not None and len(calls) == fail_after:
            raise RuntimeError("killed")
        calls.append(len(x))
        return ENCODE_BLOCK(autoencoder, x)

    monkeypatch.setattr(encode, "encode_block", counted)
    return calls


def _bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def test_latents_are_the_posterior_means(images: Path, weights: Path, tmp_path: Path) -> None:
    """Each row is the encoder's posterior mean of the ADM-cropped image (mirrored copy in the next row),
    labels follow the sorted class folders, the statistics are those of the rows, and LatentDataset
    reads z = (m − mean)/std."""
    out = tmp_path / "latents"
    encode.main(_argv(images, out, weights, "--flip-copies"))
    meta = read_meta(out)
    files = sorted((images / "n01").iterdir()) + sorted((images / "n02").iterdir())
    assert meta["done"] and meta["count"] == 28 and meta["classes"] == ["n01", "n02"]
    assert meta["converted_to_rgb"] == len(MODES) and meta["latent_shape"] == [4, 8, 8]
    assert np.load(out / "labels.npy").tolist() == [0] * 14 + [1] * 14
    latents = np.load(out / "latents.npy")
    autoencoder = load_autoencoder(TINY, weights)
    with Image.open(files[5]) as image:
        x = to_unit_range(adm_center_crop(image, 16))[None]
    with torch.inference_mode():
        m = autoencoder.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean.numpy()
    np.testing.assert_allclose(latents[10:12], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta["data_mean"], latents.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(meta["data_std"], latents.std(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(meta["std"], np.array(meta["data_std"]) * 2)  # edm2: std 0.5
    z, y = LatentDataset(out, expect_vae=TINY)[11]
    std, mean = np.array(meta["std"])[:, None, None], np.array(meta["mean"])[:, None, None]
    np.testing.assert_allclose(z.numpy(), (latents[11] - mean) / std, rtol=1e-5, atol=1e-6)
    assert y == 0 and not list(out.glob("progress-*"))


def test_a_flat_folder_is_unlabelled(weights: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        Image.new("RGB", (20 + i, 16), (40 * i, 0, 0)).save(flat / f"{i}.jpg")
    encode.main(_argv(flat, tmp_path / "latents", weights, "--normalisation", "sd"))
    meta = read_meta(tmp_path / "latents")
    assert meta["num_classes"] == 0 and np.load(tmp_path / "latents" / "labels.npy").tolist() == [-1] * 5
    assert meta["mean"] == [0.0] * 4 and meta["std"] == [1 / TINY_VAE["scaling_factor"]] * 4
    data = LatentDataset(tmp_path / "latents")
    assert data.num_classes == 0 and data[4][1] == 0


def test_a_killed_run_resumes_to_the_same_bytes(
    images: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Stopped after 2 of 4 blocks, the rerun encodes only blocks 3 and 4 and writes the files of an
    uninterrupted run byte for byte; a third run finds the folder complete and encodes nothing."""
    encode.main(_argv(images, tmp_path / "straight", weights))
    out = tmp_path / "resumed"
    _count_blocks(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        encode.main(_argv(images, out, weights))
    assert not read_meta(out)["done"]
    assert np.load(out / "progress-0.npy")[:, 0].tolist() == [1, 1, 0, 0]
    calls = _count_blocks(monkeypatch)
    encode.main(_argv(images, out, weights))
    assert calls == [4, 2]  # blocks 3 (images 8–11) and 4 (12–13) only
    assert _bytes(out) == _bytes(tmp_path / "straight")
    with caplog.at_level(logging.INFO):
        encode.main(_argv(images, out, weights))
    assert calls == [4, 2] and f"{out}: already complete (14 latents)" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    register_tiny()
    encode.main(argv)


@pytest.mark.slow
def test_two_processes_finish_a_one_process_run_to_the_same_bytes(
    images: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    """One process stops after block 1 of 4; two processes (torchrun's environment, gloo) share the other
    three (rank 0: block 3, rank 1: blocks 2 and 4) and give the one-process run's files byte for byte
    (all with one CPU thread: oneDNN's convolutions round differently with another thread count)."""
    encode.main(_argv(images, tmp_path / "one", weights, "--flip-copies"))
    out = tmp_path / "two"
    _count_blocks(monkeypatch, fail_after=1)
    with pytest.raises(RuntimeError, match="killed"):
        encode.main(_argv(images, out, weights, "--flip-copies"))
    argv = _argv(images, out, weights, "--flip-copies")
    mp.start_processes(_as_torchrun_rank, args=(2, _free_port(), argv), nprocs=2, start_method="spawn")
    assert _bytes(out) == _bytes(tmp_path / "one")


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        encode.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_any_work(
    images: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "latents"
    encode.main(_argv(images, out, weights))
    calls = _count_blocks(monkeypatch)
    before = _bytes(out)
    empty = tmp_path / "empty"
    (empty / "n01").mkdir(parents=True)
    assert f"--input {empty} holds no images" in _error(_argv(empty, tmp_path / "x", weights), capsys)
    Image.new("RGB", (16, 16)).save(images / "stray.png")
    err = _error(_argv(images, tmp_path / "x", weights), capsys)
    assert f"--input {images} holds both images (stray.png, ...) and class folders (n01/" in err
    (images / "stray.png").unlink()
    err = _error([*_argv(images, out, weights), "--resolution", "32"], capsys)
    assert f"--out {out} holds latents made otherwise (image_resolution: 16 there, 32 here)" in err
    other = save_tiny_weights(tmp_path / "other.safetensors", seed=1)
    err = _error([*_argv(images, out, other), "--normalisation", "sd"], capsys)
    assert "vae_weights_sha256: '" in err and "normalisation: 'edm2' there, 'sd' here" in err
    assert "--resolution 15: image shape (3, 15, 15)" in _error(
        [*_argv(images, out, weights), "--resolution", "15"], capsys
    )
    assert "--vae sd-vae: allowed" in _error([*_argv(images, out, weights), "--vae", "sd-vae"], capsys)
    monkeypatch.setitem(vae.VAE_CONFIGS, "gray", {**TINY_VAE, "in_channels": 1})
    assert "--vae gray takes 1-channel images" in _error(
        [*_argv(images, out, weights), "--vae", "gray"], capsys
    )
    err = _error(_argv(images, out, tmp_path / "missing.safetensors"), capsys)
    assert f"VAE weights file {tmp_path / 'missing.safetensors'} does not exist" in err
    assert calls == [] and _bytes(out) == before and not (tmp_path / "x").exists()
    assert json.loads((out / "meta.json").read_text())["done"]
