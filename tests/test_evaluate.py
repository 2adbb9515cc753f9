"""``python -m diffusionflow.evaluate``: grid on tiny checkpoints (agreeing with the training callback),
compare on random-init Inception weights (the real ones cannot be downloaded here), prefetch, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from diffusionflow.evaluate import main
from diffusionflow.metrics.extractors import WEIGHTS_FILENAME, save_random_inception_weights
from diffusionflow.train import train
from train.conftest import compose_train

N, BATCH = 61, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, overrides: list[str]) -> Path:
    try:
        train(compose_train(overrides, out))
    finally:
        GlobalHydra.instance().clear()
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache_dir) -> Path:
    """4 training steps (EMA ≠ raw), measured by the callback with both weights after step 3 (deferred to
    the next hook, so that the EMA update of step 3 is in) and when training ends (before the EMA
    callback copies the averaged weights into the module); a checkpoint after every step."""
    return _train(
        tmp_path_factory.mktemp("digits"),
        [
            "experiment=digits_unet",
            "trainer.max_steps=4",
            "callbacks.final_eval.num_samples=16",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.every_n_epochs=null",
            "callbacks.model_checkpoint.save_top_k=-1",
            f"callbacks.fd_digits.cache_dir={cache_dir}",
            f"callbacks.fd_digits.num_samples={N}",
            f"callbacks.fd_digits.batch_size={BATCH}",
            "callbacks.fd_digits.samplers=[heun:3]",
            "callbacks.fd_digits.every_n_steps=3",
            "callbacks.fd_digits.also_raw=true",
        ],
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("toy"), [])


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _grid(ckpt: Path, out: Path, *args: str) -> list[dict[str, str]]:
    main(["grid", "--ckpt", str(ckpt), "--out", str(out), *args])
    assert (out / "fid_vs_nfe.png").is_file()
    return _csv(out / "grid.csv")


@pytest.mark.parametrize("weights", ["ema", "raw"])
@pytest.mark.parametrize("step", [3, 4])
def test_grid_fd_digits_agrees_with_the_callback(digits_run, cache_dir, tmp_path, weights, step):
    rows = _grid(
        digits_run / "checkpoints" / f"step_{step:07d}.ckpt",
        tmp_path,
        *("--samplers", "heun:3,ddim:4", "--metric", "fd_digits", "--weights", weights),
        *("--num-samples", str(N), "--batch-size", "7", "--cache-dir", str(cache_dir)),
    )
    assert [(r["key"], r["nfe"], r["steps"]) for r in rows] == [
        (f"fd_digits/61_heun5_{weights}", "5", "3"),
        (f"fd_digits/61_ddim4_{weights}", "4", "4"),
    ]
    assert {r["seeds"] for r in rows} == {"0-60"} and {r["weights"] for r in rows} == {weights}
    callback = {(int(r["step"]), r["key"]): r for r in _csv(digits_run / "eval" / "fid.csv")}
    assert sorted(callback) == [(s, f"fd_digits/61_heun5_{w}") for s in (3, 4) for w in ("ema", "raw")]
    assert (
        callback[step, "fd_digits/61_heun5_ema"]["value"] != callback[step, "fd_digits/61_heun5_raw"]["value"]
    )
    # the same images (other batch size) from the same weights, and the same cached reference statistics
    assert float(rows[0]["value"]) == pytest.approx(float(callback[step, rows[0]["key"]]["value"]), rel=1e-6)
    assert rows[0]["reference"] == callback[step, rows[0]["key"]]["reference"]


def test_grid_toy(toy_run, tmp_path):
    rows = _grid(
        toy_run / "checkpoints" / "last.ckpt",
        tmp_path,
        "--samplers",
        "heun:3,ddim:4",
        "--metric",
        "toy",
        "--num-samples",
        "64",
    )
    metrics = {r["metric"] for r in rows}
    assert {"sliced_w2", "energy_distance", "sliced_w2_floor", "log_density"} <= metrics
    assert {(r["sampler"], r["nfe"]) for r in rows} == {("heun", "5"), ("ddim", "4")}
    assert "toy/" not in rows[0]["key"] and rows[0]["key"].endswith("_ema")


def test_grid_rejects_bad_input_before_work(toy_run, tmp_path, capsys):
    for args, message in [
        (
            ["--metric", "fd_digits", "--samplers", "heun:3"],
            "--metric fd_digits does not fit data of shape [2]",
        ),
        (["--metric", "toy", "--samplers", "heun"], "expected name:steps"),
        (
            ["--metric", "fid", "--samplers", "heun:3", "--inception-weights", str(tmp_path / "w.pth")],
            "w.pth not found",
        ),
        (["--metric", "toy", "--samplers", "heun:3", "--num-samples", "1"], "--num-samples 1 must be >= 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _grid(toy_run / "checkpoints" / "last.ckpt", tmp_path, *args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "grid.csv").exists()


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    """Two small uint8 NHWC .npz sets of different statistics, and random-init Inception weights."""
    root = tmp_path_factory.mktemp("compare")
    g = torch.Generator().manual_seed(0)
    for name, size, scale in (("a", 5, 60.0), ("b", 6, 25.0)):
        images = (128 + scale * torch.randn(size, 16, 16, 3, generator=g)).clamp(0, 255).to(torch.uint8)
        np.savez(root / f"{name}.npz", samples=images.numpy())
    save_random_inception_weights(root / "inception.pth")
    return {"a": root / "a.npz", "b": root / "b.npz", "weights": root / "inception.pth"}


def test_compare_fid_kid_isc(image_sets, tmp_path):
    out = tmp_path / "metrics.json"
    a, b, weights = (str(image_sets[k]) for k in ("a", "b", "weights"))
    common = [
        "--inception-weights",
        weights,
        "--isc-splits",
        "2",
        "--kid-subsets",
        "5",
        "--kid-subset-size",
        "4",
    ]
    result = main(["compare", a, b, "--fid", "--kid", "--isc", *common, "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result) == {
        "frechet_inception_distance",
        "kernel_inception_distance_mean",
        "kernel_inception_distance_std",
        "inception_score_mean",
        "inception_score_std",
        "num_samples_input1",
        "num_samples_input2",
        "extractor",
    }
    assert (result["num_samples_input1"], result["num_samples_input2"]) == (5, 6)
    assert result["extractor"] == "inception-v3-compat"
    assert result["frechet_inception_distance"] > 0 and result["inception_score_mean"] > 1


def test_compare_errors_name_the_fix(image_sets, tmp_path, monkeypatch, capsys):
    a, b = str(image_sets["a"]), str(image_sets["b"])
    cases = [
        ([a, b], "choose at least one metric"),
        ([a, str(tmp_path / "b.npz"), "--fid"], "expected a folder of .png files or a .npz file"),
        ([a, b, "--kid", "--kid-subset-size", "11"], "--kid-subset-size 11 must be in [2, 5]"),
        ([a, b, "--fid", "--inception-weights", str(tmp_path / "w.pth")], f"w.pth not found in {tmp_path}"),
        (
            [a, b, "--fid", "--inception-weights", str(tmp_path / "w.pth")],
            "python -m diffusionflow.evaluate prefetch",
        ),
    ]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cases.append(
        ([a, b, "--fid"], f"{WEIGHTS_FILENAME} not found in {tmp_path / 'torch' / 'hub' / 'checkpoints'}")
    )
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_prefetch_prints_where_the_file_went(tmp_path, monkeypatch, capsys):
    """No network here: the download itself is replaced; the command's plumbing is tested."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst: Path(dst).write_bytes(b"w"))
    main(["prefetch", "--dest", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / WEIGHTS_FILENAME)
    assert (tmp_path / WEIGHTS_FILENAME).read_bytes() == b"w"
