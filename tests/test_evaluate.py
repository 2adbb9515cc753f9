"""``python -m diffusionflow.evaluate``: samplers on tiny checkpoints (agreeing with the training callback),
sets on random-init Inception weights (the real ones cannot be downloaded here), prefetch, errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from diffusionflow.compare import main as compare_main
from diffusionflow.evaluate import main
from diffusionflow.metrics.extractors import WEIGHTS_FILENAME, save_random_inception_weights
from diffusionflow.metrics.images import save_png_folder
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
    the next hook, so that the EMA update of step 3 is in) and when training ends (raw: the weights the
    EMA callback kept when it copied the averaged ones into the module); a checkpoint after every step."""
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


def _samplers(ckpt: Path, out: Path, *args: str) -> list[dict[str, str]]:
    main(["samplers", "--ckpt", str(ckpt), "--out", str(out), *args])
    assert (out / "fid_vs_nfe.png").is_file()
    return _csv(out / "grid.csv")


@pytest.mark.parametrize("weights", ["ema", "raw"])
@pytest.mark.parametrize("step", [3, 4])
def test_samplers_fd_digits_agrees_with_the_callback(digits_run, cache_dir, tmp_path, weights, step):
    rows = _samplers(
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


def test_samplers_toy(toy_run, tmp_path):
    rows = _samplers(
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


def test_samplers_rejects_bad_input_before_work(toy_run, tmp_path, capsys):
    for args, message in [
        (
            ["--metric", "fd_digits", "--samplers", "heun:3"],
            "--metric fd_digits does not fit samples of shape [2]",
        ),
        (["--metric", "toy", "--samplers", "heun"], "expected name:steps"),
        (
            ["--metric", "fid", "--samplers", "heun:3", "--inception-weights", str(tmp_path / "w.pth")],
            "w.pth not found",
        ),
        (["--metric", "toy", "--samplers", "heun:3", "--num-samples", "1"], "--num-samples 1 must be >= 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _samplers(toy_run / "checkpoints" / "last.ckpt", tmp_path, *args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "grid.csv").exists()


def _nll(ckpt: Path, out: Path, *args: str) -> dict:
    main(["nll", "--ckpt", str(ckpt), "--out", str(out), *args])
    return json.loads((out / "nll.json").read_text())


def test_nll_toy(toy_run, tmp_path, capsys):
    """Both methods on 16 points of the toy run's blog mixture, beside its exact log-density."""
    result = _nll(
        toy_run / "checkpoints" / "last.ckpt",
        tmp_path,
        *("--num-samples", "16", "--steps", "4", "--points", "8", "--batch-size", "7"),
    )
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed[:3]] == ["ode", "elbo", "exact"]
    assert set(result["methods"]) == {"ode", "elbo"} and result["dequantization"] is None
    assert (result["dim"], result["num_samples"], result["dtype"], result["weights"]) == (
        2,
        16,
        "float64",
        "ema",
    )
    assert result["methods"]["ode"]["divergence"] == "exact" and result["methods"]["ode"]["nfe"] == 16
    summaries = [*result["methods"].values(), *result["exact"].values()]
    for s in summaries:
        assert all(math.isfinite(s[k]) for k in ("nll_nats", "nll_nats_sem", "bits_per_dim"))
        assert s["bits_per_dim"] == pytest.approx(s["nll_nats"] / (2 * math.log(2)))
    for s in result["methods"].values():  # the paired excess over the mixture's exact NLL
        assert s["excess_nats"] == pytest.approx(s["nll_nats"] - result["exact"]["data"]["nll_nats"])
    # the exact values do not depend on the model: they are the mixture's at the 16 points
    assert result["exact"]["data"]["nll_nats"] == pytest.approx(
        result["exact"]["t_min"]["nll_nats"], abs=1e-3
    )
    # `compare` puts them in its table when the run folder holds eval/nll.json
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    config = torch.load(toy_run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"][
        "config"
    ]
    OmegaConf.save(config, (run / ".hydra").mkdir() or run / ".hydra" / "config.yaml")
    shutil.copy(toy_run / "metrics.json", run / "metrics.json")
    shutil.copy(tmp_path / "nll.json", run / "eval" / "nll.json")
    (row,) = compare_main([str(run), "--metrics", "nll/*"])
    for m in ("ode", "elbo"):
        assert row.mean_std(f"nll/{m}_nats")[0] == result["methods"][m]["nll_nats"]
        assert row.mean_std(f"nll/{m}_bits_per_dim")[0] == result["methods"][m]["bits_per_dim"]


def test_nll_images_dequantised_with_hutchinson(digits_run, tmp_path):
    """The native 8×8 digits lie on 17 levels v/8 − 1: dequantised in bins of 1/8, offset log₂ 8 = 3
    bits/dim; the class-conditional UNet is conditioned on each image's label."""
    result = _nll(
        digits_run / "checkpoints" / "last.ckpt",
        tmp_path,
        *("--split", "val", "--num-samples", "3", "--steps", "1", "--points", "4", "--probes", "2"),
    )
    assert (result["dequantization"], result["levels"], result["offset_bits"]) == ("uniform", 17, 3.0)
    assert (result["dim"], result["dtype"], result["conditional"]) == (64, "float32", True)
    ode = result["methods"]["ode"]
    assert (ode["divergence"], ode["probes"], ode["nfe"]) == ("hutchinson", 2, 4)
    for s in result["methods"].values():
        assert math.isfinite(s["nll_nats"]) and math.isfinite(s["nll_nats_sem"])
        assert s["bits_per_dim"] == pytest.approx(s["nll_nats"] / (64 * math.log(2)) + 3)
    assert "exact" not in result


def test_nll_rejects_bad_input_before_work(toy_run, tmp_path, capsys):
    for args, message in [
        (["--method", "ode,exact"], "--method ode,exact: allowed a comma-separated list of distinct methods"),
        (["--method", "ode,ode"], "from ['ode', 'elbo']"),
        (["--num-samples", "1"], "--num-samples 1 must be >= 2"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--probes", "0"], "--probes 0 must be >= 1"),
        (
            ["--split", "val"],
            "--split val: the run's data config (diffusionflow.data.toy2d.Toy2D) has no val_dataset",
        ),
        (["--num-samples", "100000"], "--num-samples 100000 exceeds the 65536 points of the train split"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _nll(toy_run / "checkpoints" / "last.ckpt", tmp_path, *args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "nll.json").exists()


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    """Two small uint8 NHWC .npz sets of different statistics, and random-init Inception weights."""
    root = tmp_path_factory.mktemp("sets")
    g = torch.Generator().manual_seed(0)
    for name, size, scale in (("a", 5, 60.0), ("b", 6, 25.0)):
        images = (128 + scale * torch.randn(size, 16, 16, 3, generator=g)).clamp(0, 255).to(torch.uint8)
        np.savez(root / f"{name}.npz", samples=images.numpy())
    save_random_inception_weights(root / "inception.pth")
    return {"a": root / "a.npz", "b": root / "b.npz", "weights": root / "inception.pth"}


def test_sets_fid_kid_isc(image_sets, tmp_path):
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
    result = main(["sets", a, b, "--fid", "--kid", "--isc", *common, "--json", str(out)])
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


def test_sets_errors_name_the_fix(image_sets, tmp_path, monkeypatch, capsys):
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
            main(["sets", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_prefetch_prints_where_the_file_went(tmp_path, monkeypatch, capsys):
    """No network here: the download itself is replaced; the command's plumbing is tested."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst: Path(dst).write_bytes(b"w"))
    main(["prefetch", "--dest", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / WEIGHTS_FILENAME)
    assert (tmp_path / WEIGHTS_FILENAME).read_bytes() == b"w"


def _pngs(folder: Path, sizes: list[int]) -> list[Path]:
    """One random RGB PNG per entry of ``sizes`` (square, that many pixels a side), named 000.png, …"""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(len(sizes))
    paths = []
    for i, size in enumerate(sizes):
        images = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)
        paths += save_png_folder(images, folder, start=i)
    return paths


def _sets_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["sets", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_sets_check_every_image_size_before_extraction(image_sets, tmp_path, capsys):
    """Each batch of 2 has one size (the old per-batch check passed); the set has two. The missing
    weights file shows that nothing was loaded: the size scan comes first."""
    mixed = _pngs(tmp_path / "mixed", [16, 16, 8, 8, 8])
    missing = str(tmp_path / "w.pth")
    err = _sets_error(
        [
            str(tmp_path / "mixed"),
            str(image_sets["a"]),
            "--fid",
            "--batch-size",
            "2",
            "--inception-weights",
            missing,
        ],
        capsys,
    )
    assert err == (
        f"error: {tmp_path / 'mixed'}: images of 2 sizes (height x width): 8x8 (3 images, e.g. {mixed[2]}), "
        f"16x16 (2 images, e.g. {mixed[0]}); a set must have one size\n"
    )


def test_sets_of_different_sizes_need_a_flag(image_sets, tmp_path, capsys, caplog, monkeypatch):
    """Refused by default although Inception resizes both to 299; ``--allow-size-mismatch`` proceeds
    with a warning. (The network and features are stubbed: what is tested is which sets reach
    extraction.)"""
    extracted = []

    def features(net, source, batch_size):
        extracted.append(Path(source))
        n = {image_sets["a"]: 5, big: 4}[Path(source)]
        return torch.randn(n, net.feature_dim, dtype=torch.float64), torch.randn(n, 1008)

    monkeypatch.setattr("diffusionflow.evaluate._features", features)
    net = SimpleNamespace(feature_dim=8, name="stub")  # Inception takes ~10 s to build on a CPU
    monkeypatch.setattr("diffusionflow.evaluate._inception", lambda weights, device: net)
    big = tmp_path / "big.npz"
    images = torch.randint(
        0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    np.savez(big, samples=images.numpy())
    a, weights = str(image_sets["a"]), str(image_sets["weights"])
    err = _sets_error([a, str(big), "--fid", "--inception-weights", weights], capsys)
    assert f"INPUT1 {a} holds 16x16 images and INPUT2 {big} 32x32 (height x width)" in err
    assert "pass --allow-size-mismatch to compare them anyway" in err and not extracted
    # IS reads INPUT1 only: the size of INPUT2 does not matter
    main(["sets", a, str(big), "--isc", "--isc-splits", "2", "--inception-weights", weights])
    assert extracted == [image_sets["a"]] and not caplog.records
    result = main(["sets", a, str(big), "--fid", "--allow-size-mismatch", "--inception-weights", weights])
    assert extracted[1:] == [image_sets["a"], big] and math.isfinite(result["frechet_inception_distance"])
    assert [r.getMessage() for r in caplog.records if "compared anyway" in r.getMessage()] == [
        f"INPUT1 {a} holds 16x16 images and INPUT2 {big} 32x32 (height x width): compared anyway "
        "(--allow-size-mismatch), each resized by the extractor"
    ]


def test_sets_name_an_unreadable_file(image_sets, tmp_path, capsys):
    weights = ["--fid", "--inception-weights", str(image_sets["weights"])]
    paths = _pngs(tmp_path / "garbage", [16, 16, 16])
    paths[1].write_bytes(b"not a png at all")
    err = _sets_error([str(tmp_path / "garbage"), str(image_sets["a"]), *weights], capsys)
    assert err.startswith(f"error: {paths[1]}: not a readable image (UnidentifiedImageError: ")
    # a header that reads but pixels that do not: named when the pixels are read
    paths = _pngs(tmp_path / "truncated", [16, 16, 16])
    paths[2].write_bytes(paths[2].read_bytes()[:100])
    err = _sets_error([str(tmp_path / "truncated"), str(image_sets["a"]), *weights], capsys)
    assert err.startswith(f"error: {paths[2]}: not a readable image (OSError: ")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    err = _sets_error([str(tmp_path / "broken.npz"), str(image_sets["a"]), *weights], capsys)
    assert err.startswith(f"error: {tmp_path / 'broken.npz'}: not a readable .npz (")


def test_a_device_that_is_not_there_is_refused(image_sets, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    a, weights = str(image_sets["a"]), str(image_sets["weights"])
    err = _sets_error([a, a, "--fid", "--inception-weights", weights, "--device", "cuda"], capsys)
    assert err == "error: --device=cuda: no CUDA device is available; allowed: cpu\n"
