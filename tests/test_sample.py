"""The sampling entry point: checkpoints (EMA / raw, any sampler), the exact oracle, noise, bad input."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from diffusionflow import sample as sample_module
from diffusionflow.checkpoint import build_module, load_module
from diffusionflow.config import ConfigError, instantiate_checked
from diffusionflow.core.samplers import Heun, seeded_noise
from diffusionflow.core.samplers import build as build_sampler
from diffusionflow.data.toy2d import mixture
from diffusionflow.evaluate import main as evaluate_main
from diffusionflow.lightning import final_eval
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.metrics.extractors import save_random_inception_weights, to_uint8
from diffusionflow.metrics.generate import generate
from diffusionflow.metrics.images import count_images, image_batches, save_png_folder
from diffusionflow.metrics.toy import energy_distance
from diffusionflow.sample import Source, sample
from diffusionflow.train import train
from helpers import compose_sample
from train.conftest import compose_train

N = 64

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert plain["arr_0"].shape == (12, 8, 8, 1) and plain["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(plain["labels"], np.arange(12) % 10)
    assert plain["guidance"] == 1.0 and plain["nfe"] == 5
    assert (tmp_path / "plain" / "samples.png").exists()
    assert not (tmp_path / "plain" / "metrics.json").exists()
    guided = run(tmp_path / "guided", *args, "guidance=3.0", "labels=[0,7]")
    np.testing.assert_array_equal(guided["labels"], [0, 7] * 6)
    assert guided["guidance"] == 3.0 and guided["nfe"] == 5
    assert not np.array_equal(guided["arr_0"][0], plain["arr_0"][0])


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
        (["oracle=blog", "format=jpg"], "^format='jpg': expected one of \\['npz', 'png', 'both'\\]$"),
        (["oracle=blog", "format=png"], "^format=png: oracle blog samples 2-D points, not images; .*=npz$"),
        (["ckpt_path={ckpt}", "format=both"], "^format=both: checkpoint .* samples 2-D points, not images"),
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


def images_of(out_dir: Path) -> np.ndarray:
    """samples/*.png of ``out_dir`` as uint8 NHWC (grey kept as one channel), after checking the names."""
    files = sorted((out_dir / "samples").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(len(files))]
    read = torch.cat(list(image_batches(out_dir / "samples", batch_size=7)))  # grey read as RGB
    return read[:, :1].permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("fmt", ["npz", "png", "both"])
def test_images_are_the_rounded_samples_of_their_seeds(conditional_ckpt, tmp_path, fmt):
    """Images are written as EDM writes them: ``to_uint8`` of the per-seed generator's samples, NHWC under
    ``arr_0`` in samples.npz and / or as ``samples/<index>.png``; a larger earlier run's extra PNGs go."""
    args = [f"ckpt_path={conditional_ckpt}", "weights=raw", "sampler=ddpm", "sampler.steps=3", "batch_size=5"]
    module = load_module(conditional_ckpt, "raw")
    peer = generate(module, range(12), shape=(1, 8, 8), batch_size=5, sampler=build_sampler("ddpm", steps=3))
    expected = to_uint8(peer).permute(0, 2, 3, 1).numpy()
    if fmt != "npz":
        save_png_folder(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), tmp_path / "samples")
    sample(compose_sample([f"out_dir={tmp_path}", "num_samples=12", f"format={fmt}", *args]))
    assert (tmp_path / "samples.npz").exists() == (fmt != "png")
    assert (tmp_path / "samples").is_dir() == (fmt != "npz")
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert not (tmp_path / "samples.npy.partial").exists()
    if fmt != "png":
        with np.load(tmp_path / "samples.npz", allow_pickle=False) as f:
            assert "samples" not in f.files and "images" not in f.files  # evaluate sets reads arr_0
            np.testing.assert_array_equal(f["arr_0"], expected)
            np.testing.assert_array_equal(f["labels"], np.arange(12) % 10)
        assert count_images(tmp_path / "samples.npz") == 12
    if fmt != "npz":
        np.testing.assert_array_equal(images_of(tmp_path), expected)


def test_evaluate_sets_reads_the_outputs(conditional_ckpt, tmp_path):
    """``evaluate sets`` takes samples.npz and samples/ as they are: the same 16 images, FID 0."""
    args = [f"ckpt_path={conditional_ckpt}", "weights=raw", "sampler.steps=2", "num_samples=16"]
    sample(compose_sample([f"out_dir={tmp_path}", "format=both", *args]))
    weights = save_random_inception_weights(tmp_path / "inception.pth")
    npz, pngs = str(tmp_path / "samples.npz"), str(tmp_path / "samples")
    result = evaluate_main(["sets", npz, pngs, "--fid", "--inception-weights", str(weights)])
    assert result["num_samples_input1"] == result["num_samples_input2"] == 16
    assert abs(result["frechet_inception_distance"]) < 1e-6


class Blank:
    """A model whose sampling costs next to nothing (denoiser tanh z) on RGB images: the memory test can
    then draw many."""

    num_classes = 0
    training = False
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, cfg: DictConfig) -> None:
        self.schedule = instantiate_checked(cfg.schedule, "schedule")
        self.sampler = instantiate_checked(cfg.sampler, "sampler")

    def denoiser(self, labels: Any = None, guidance: Any = None) -> Any:
        return lambda z, t: torch.tanh(z)

    def eval(self) -> Blank:
        return self

    def train(self, mode: bool = True) -> Blank:
        return self


def live_bytes() -> int:
    """Bytes of the CPU tensors and data-owning numpy arrays alive now (memory maps excluded)."""
    storages = {}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: torch's __instancecheck__ is slow over a million objects
        if (kind is torch.Tensor or kind is torch.nn.Parameter) and obj.device.type == "cpu":
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif kind is np.ndarray and obj.base is None:
            storages[obj.ctypes.data] = obj.nbytes
    return sum(storages.values())


def test_memory_does_not_grow_with_the_number_of_samples(tmp_path, monkeypatch):
    """The tensors and arrays alive (``gc``) once every batch is written, and the peak of Python's
    allocations (``tracemalloc``: numpy buffers, bytes) over the whole run, packing the npz included,
    stay flat from 4 to 16 batches, where holding the images would add 12 batches of them; the files
    hold every image."""
    batch, shape = 32, (3, 32, 32)
    monkeypatch.setattr(
        sample_module,
        "_checkpoint_source",
        lambda cfg, device: Source("blank", "raw", Blank(cfg), shape=shape),
    )
    original = sample_module.generate_batches

    def measure(n: int) -> tuple[int, int]:
        between, peaks = [], []

        def watched(*args: Any, **kwargs: Any) -> Any:
            yield from original(*args, **kwargs)
            # every batch is written: what was kept of them is alive now
            peaks.append(tracemalloc.get_traced_memory()[1])
            between.append(live_bytes())
            tracemalloc.reset_peak()  # gc.get_objects' list is not the sampler's

        monkeypatch.setattr(sample_module, "generate_batches", watched)
        overrides = ["ckpt_path=blank", "sampler=euler", "sampler.steps=1", f"batch_size={batch}"]
        cfg = compose_sample([f"out_dir={tmp_path / str(n)}", f"num_samples={n}", "format=both", *overrides])
        tracemalloc.start()
        try:
            sample(cfg)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        out = tmp_path / str(n)
        assert count_images(out / "samples.npz") == count_images(out / "samples") == n
        return between[0], max(peaks)

    small, large = measure(4 * batch), measure(16 * batch)
    held = (16 - 4) * batch * int(np.prod(shape))  # the extra images as uint8
    assert large[0] - small[0] < held / 4, (small, large, held)
    assert large[1] - small[1] < held / 4, (small, large, held)


def _two_ranks(rank: int, ports: tuple[int, int], folder: str, overrides: list[str]) -> None:
    """Rank ``rank`` of 2 as torchrun starts it (gloo): first with a different out_dir per rank (an
    error, recorded), then into one folder."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    errors = []
    os.environ["MASTER_PORT"] = str(ports[0])
    try:
        sample(compose_sample([f"out_dir={folder}/rank{rank}", *overrides]))
    except ConfigError as err:
        errors.append(str(err))
    os.environ["MASTER_PORT"] = str(ports[1])
    sample(compose_sample([f"out_dir={folder}/two", *overrides]))
    Path(folder, f"errors{rank}.json").write_text(json.dumps(errors))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_writes(conditional_ckpt, tmp_path):
    """Two gloo processes, 13 samples in batches of 4 (ranks draw 6 and 7), a stochastic sampler and
    labels: samples.npz, samples/ and samples.png are those of one process, byte for byte; different
    out_dirs per rank are refused on both ranks before anything is written."""
    overrides = [
        f"ckpt_path={conditional_ckpt}",
        "weights=raw",
        "sampler=ddpm",
        "sampler.steps=3",
        "num_samples=13",
        "batch_size=4",
        "format=both",
        "device=cpu",
    ]
    mp.spawn(_two_ranks, args=((_free_port(), _free_port()), str(tmp_path), overrides), nprocs=2, join=True)
    sample(compose_sample([f"out_dir={tmp_path / 'one'}", *overrides]))
    for rank in range(2):
        (error,) = json.loads((tmp_path / f"errors{rank}.json").read_text())
        assert error.startswith("out_dir differs between the 2 processes (rank 0: ")
        assert not (tmp_path / f"rank{rank}").exists()
    one, two = tmp_path / "one", tmp_path / "two"
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        assert a.files == b.files
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    names = sorted(p.name for p in (one / "samples").iterdir())
    assert names == sorted(p.name for p in (two / "samples").iterdir()) and len(names) == 13
    for name in [*(f"samples/{n}" for n in names), "samples.png"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_torchrun_needs_a_named_out_dir(tmp_path, monkeypatch):
    """Under torchrun the default run folder (named by the start time) could differ between processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # an earlier test may have left some
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^out_dir is the default run folder, .* give out_dir=<dir>$"):
        sample(compose_sample(["oracle=blog", f"paths.log_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="^WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT "):
        sample(compose_sample(["oracle=blog", f"out_dir={tmp_path / 'out'}"]))
    assert list(tmp_path.iterdir()) == []
