"""``evaluate samplers`` as a grid: checkpoints of one run × weights × samplers × guidance scales, checked
before any sampling, and the same ``grid.csv`` from one process and from two (torchrun's environment,
gloo on the CPU)."""

from __future__ import annotations

import csv
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from diffusionflow.checkpoint import load_module
from diffusionflow.config import instantiate_checked
from diffusionflow.evaluate import main
from diffusionflow.metrics.digits_classifier import DigitsClassifier
from diffusionflow.metrics.extractors import to_uint8
from diffusionflow.metrics.fid import reference_moments
from diffusionflow.metrics.frechet import FrechetStats, frechet_distance
from diffusionflow.metrics.generate import generate, parse_samplers
from diffusionflow.metrics.toy_samples import toy_metrics
from test_evaluate import _train as train_run

N = 25  # odd: two ranks get 12 and 13 seeds
SMALL = ("--num-samples", str(N), "--batch-size", "8")
pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, overrides: list[str]) -> Path:
    return train_run(out, overrides) / "checkpoints"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The class-conditional tiny digits UNet, a checkpoint after each of its 2 steps (and last.ckpt)."""
    return _train(
        tmp_path_factory.mktemp("digits"),
        [
            "experiment=digits_unet",
            "~callbacks.fd_digits",
            "trainer.max_steps=2",
            "callbacks.final_eval.num_samples=4",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.every_n_epochs=null",
            "callbacks.model_checkpoint.save_top_k=-1",
        ],
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """An unconditional 2-D run of 2 steps with post-hoc EMA snapshots (σ_rel 0.05 and 0.1) and a
    checkpoint after each step."""
    return _train(
        tmp_path_factory.mktemp("toy"),
        [
            "trainer.max_steps=2",
            "callbacks.final_eval.num_samples=4",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.every_n_epochs=null",
            "callbacks.model_checkpoint.save_top_k=-1",
            "+callbacks@callbacks.posthoc_ema=posthoc_ema",
            "callbacks.posthoc_ema.snapshot_every_n_steps=1",
        ],
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _grid(ckpt: Path | str, out: Path, *args: str) -> list[dict[str, str]]:
    """The rows of ``evaluate samplers`` with heun:2 on N seeds in batches of 8."""
    main(["samplers", "--ckpt", str(ckpt), "--out", str(out), "--samplers", "heun:2", *args])
    return _csv(out / "grid.csv")


def _fd(ckpt: Path | str, out: Path, cache_dir: Path, *args: str) -> list[dict[str, str]]:
    return _grid(ckpt, out, *SMALL, "--metric", "fd_digits", "--cache-dir", str(cache_dir), *args)


def _toy(ckpt: Path | str, out: Path, *args: str) -> list[dict[str, str]]:
    return _grid(ckpt, out, *SMALL, "--metric", "toy", *args)


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["samplers", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _datamodule(module) -> Any:
    """The set-up DataModule of the module's run."""
    datamodule = instantiate_checked(OmegaConf.create(module.hparams["config"]).data, "data")
    datamodule.setup("fit")
    return datamodule


@pytest.fixture
def nothing_sampled(monkeypatch) -> list[str]:
    """Records every call of the generators the grid uses (and fails it): empty = no sampling started."""
    calls: list[str] = []

    def record(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return fail

    for name in ("generate", "generate_features"):
        monkeypatch.setattr(f"diffusionflow.evaluate.{name}", record(name))
    return calls


def test_guidance_rows(digits, cache_dir, tmp_path):
    """A row of scale w is the Fréchet distance of the images of ``generate(..., guidance=w)``, computed
    here directly (another batch size); w = 1 is the conditional model without guidance (the run's own
    scale, 1), and w = 3 gives other images."""
    ckpt = digits / "step_0000002.ckpt"
    rows = _fd(ckpt, tmp_path / "grid", cache_dir, "--guidance", "1,3")
    assert [(r["key"], r["guidance"]) for r in rows] == [
        (f"fd_digits/{N}_heun3_ema_cfg1", "1.0"),
        (f"fd_digits/{N}_heun3_ema_cfg3", "3.0"),
    ]
    assert (tmp_path / "grid" / "fid_vs_guidance.png").is_file()
    (own,) = _fd(ckpt, tmp_path / "own", cache_dir)
    assert own["guidance"] == "" and float(rows[0]["value"]) == pytest.approx(float(own["value"]), rel=1e-9)
    assert float(rows[1]["value"]) != pytest.approx(float(rows[0]["value"]), rel=1e-5)

    module = load_module(ckpt, "ema")
    classifier = DigitsClassifier(cache_dir)
    sampler = parse_samplers(["heun:2"])[0]
    images = generate(module, range(N), shape=(1, 8, 8), batch_size=N, sampler=sampler, guidance=3.0)
    stats = FrechetStats(classifier.feature_dim)
    stats.update(classifier(to_uint8(images)))
    mu, sigma, _ = reference_moments("train", _datamodule(module), classifier, cache_dir)
    assert float(rows[1]["value"]) == pytest.approx(frechet_distance(*stats.mean_cov(), mu, sigma), rel=1e-6)


def test_guidance_on_an_unconditional_checkpoint_is_refused_before_work(
    toy, tmp_path, nothing_sampled, capsys
):
    ckpt = toy / "last.ckpt"
    args = ["--ckpt", str(ckpt), "--out", str(tmp_path), "--samplers", "heun:2", "--metric", "toy"]
    err = _error([*args, "--guidance", "1,2"], capsys)
    assert err == (
        f"error: --guidance 1,2: {ckpt} is an unconditional checkpoint (data.num_classes=0); "
        "classifier-free guidance needs a class-conditional one\n"
    )
    assert nothing_sampled == [] and not (tmp_path / "grid.csv").exists()


def test_a_folder_of_checkpoints_gives_rows_by_training_images(digits, cache_dir, tmp_path):
    """Copies named against their step order (``a`` is step 2, ``b`` step 1) and last.ckpt, a copy of
    step 2: one row per checkpoint, in the order of training images = step × global batch."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(digits / "step_0000002.ckpt", folder / "a.ckpt")
    shutil.copy(digits / "step_0000001.ckpt", folder / "b.ckpt")
    shutil.copy(digits / "last.ckpt", folder / "last.ckpt")
    batch = torch.load(folder / "a.ckpt", weights_only=True)["hyper_parameters"]["config"]["data"][
        "batch_size"
    ]
    rows = _fd(folder, tmp_path / "grid", cache_dir)
    assert [(r["checkpoint"], int(r["train_images"])) for r in rows] == [
        (str(folder / "b.ckpt"), 1 * batch),
        (str(folder / "a.ckpt"), 2 * batch),
    ]
    assert rows[0]["value"] != rows[1]["value"]
    assert (tmp_path / "grid" / "fid_vs_train_images.png").is_file()
    # a glob of the run's own files: the same rows
    again = _fd(f"{digits}/step_*.ckpt", tmp_path / "glob", cache_dir)
    assert [(r["train_images"], r["value"]) for r in again] == [(r["train_images"], r["value"]) for r in rows]
    assert [Path(r["checkpoint"]).name for r in again] == ["step_0000001.ckpt", "step_0000002.ckpt"]


def test_checkpoint_sets_are_checked_before_work(digits, toy, tmp_path, nothing_sampled, capsys):
    common = ["--out", str(tmp_path / "out"), "--samplers", "heun:2", "--metric", "fd_digits"]
    pattern = str(tmp_path / "nowhere" / "*.ckpt")
    err = _error(["--ckpt", pattern, *common], capsys)
    assert err.startswith(f"error: --ckpt {pattern}: the pattern matches no file; allowed: ")
    (tmp_path / "empty").mkdir()
    err = _error(["--ckpt", str(tmp_path / "empty"), *common], capsys)
    assert f"--ckpt {tmp_path / 'empty'}: the folder holds no *.ckpt file" in err
    # a file that is not a checkpoint, beside good ones: load_module's error, before any sampling
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(digits / "step_0000001.ckpt", folder / "a.ckpt")
    (folder / "b.ckpt").write_bytes(b"not a checkpoint")
    err = _error(["--ckpt", str(folder), *common], capsys)
    assert f"ckpt_path={folder / 'b.ckpt'} is not a checkpoint of diffusionflow.train" in err
    shutil.copy(toy / "last.ckpt", folder / "b.ckpt")  # another run's data: another reference
    err = _error(["--ckpt", str(folder), *common], capsys)
    assert f"{folder / 'b.ckpt'} was trained on other data than {folder / 'a.ckpt'} (data.shape/" in err
    for args, message in [
        (["--guidance", "1,x"], "--guidance 1,x: allowed a comma-separated list of distinct numbers >= 0"),
        (["--guidance", "2,2"], "--guidance 2,2: allowed a comma-separated list of distinct"),
        (["--guidance", "-1"], "--guidance -1: allowed"),
        (
            ["--weights", "ema,best"],
            "--weights ema,best: allowed a comma-separated list of distinct values from",
        ),
        (["--samplers", "heun:2,heun:2"], "--samplers heun:2,heun:2: a sampler is named twice"),
    ]:
        assert message in _error(["--ckpt", str(digits / "last.ckpt"), *common, *args], capsys)
    assert nothing_sampled == [] and not (tmp_path / "out").exists()


def test_weights_axis(digits, cache_dir, tmp_path):
    rows = _fd(digits / "last.ckpt", tmp_path, cache_dir, "--weights", "ema,raw")
    assert [r["weights"] for r in rows] == ["ema", "raw"] and rows[0]["value"] != rows[1]["value"]


def test_posthoc_ema_widths(toy, tmp_path):
    """``--ema-sigma-rel`` rows are the toy metrics of the samples of ``load_module(path,
    "sigma_rel:x")``, computed here directly (another batch size), for each checkpoint; the training
    EMA beside them with ``--weights ema``."""
    rows = _toy(f"{toy}/step_*.ckpt", tmp_path, "--weights", "ema", "--ema-sigma-rel", "0.05,0.1")
    rows = [r for r in rows if r["metric"] == "sliced_w2"]
    steps = ["step_0000001.ckpt", "step_0000002.ckpt"]
    weights = ["ema", "sigma_rel:0.05", "sigma_rel:0.1"]
    assert [(Path(r["checkpoint"]).name, r["weights"]) for r in rows] == [
        (c, w) for c in steps for w in weights
    ]
    assert rows[-1]["key"] == f"sliced_w2/{N}_heun3_sigma_rel:0.1"
    assert len({r["value"] for r in rows[3:]}) == 3  # after one step every power-function EMA is the weights
    heun = parse_samplers(["heun:2"])[0]
    for row in (r for r in rows if r["weights"] != "ema"):
        module = load_module(row["checkpoint"], row["weights"])
        samples = generate(module, range(N), shape=(2,), batch_size=N, sampler=heun)
        direct = toy_metrics(samples, _datamodule(module).train_set, N, 0)["sliced_w2"]
        assert float(row["value"]) == pytest.approx(direct, rel=1e-6)


def test_posthoc_widths_are_checked_before_work(toy, tmp_path, nothing_sampled, capsys):
    """A width the snapshots up to the first checkpoint cannot reconstruct, one outside (0, 0.3003), and a
    run without snapshots: refused before any sampling, naming the width (and the checkpoint)."""
    common = ["--out", str(tmp_path / "out"), "--samplers", "heun:2", "--metric", "toy"]
    err = _error(["--ckpt", f"{toy}/step_*.ckpt", *common, "--ema-sigma-rel", "0.1,0.001"], capsys)
    assert f"weights=sigma_rel:0.001 for {toy / 'step_0000001.ckpt'}: " in err
    assert "is outside what the stored EMA profiles can reconstruct" in err
    err = _error(["--ckpt", str(toy / "last.ckpt"), *common, "--ema-sigma-rel", "0.1,0.5"], capsys)
    assert "--ema-sigma-rel 0.1,0.5: allowed a comma-separated list of distinct numbers in (0, 0.3003)" in err
    elsewhere = tmp_path / "run" / "checkpoints" / "last.ckpt"  # a checkpoint without its run's snapshots
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(toy / "last.ckpt", elsewhere)
    err = _error(["--ckpt", str(elsewhere), *common, "--ema-sigma-rel", "0.1"], capsys)
    assert f"weights=sigma_rel:0.1: checkpoint {elsewhere} has no snapshots up to its step 2" in err
    assert nothing_sampled == [] and not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_rank(rank: int, world: int, commands: list[tuple[int, list[str]]]) -> None:
    """A process as torchrun starts it (its environment), running each command on its own port."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    for port, argv in commands:
        os.environ["MASTER_PORT"] = str(port)
        main(argv)


@pytest.mark.slow
def test_two_processes_give_the_one_process_grid(digits, toy, cache_dir, tmp_path, capsys):
    """Two checkpoints × two guidance scales (Fréchet distance), and two checkpoints × the EMA and a
    post-hoc width (toy metrics), by one process and by two (N = 25: shards of 12 and 13 seeds): the
    same rows, values within 1e-6 relative."""
    common = ["--samplers", "heun:2", *SMALL, "--device", "cpu"]
    fd = ("--metric", "fd_digits", "--cache-dir", str(cache_dir), "--guidance", "1,3")
    posthoc = ("--metric", "toy", "--weights", "ema", "--ema-sigma-rel", "0.1")
    grids = {
        "fd": ["--ckpt", f"{digits}/step_*.ckpt", *fd, *common],
        "toy": ["--ckpt", f"{toy}/step_*.ckpt", *posthoc, *common],
    }

    def command(name: str, procs: str) -> list[str]:
        return ["samplers", *grids[name], "--out", str(tmp_path / procs / name)]

    for name in grids:
        main(command(name, "one"))
    commands = [(_free_port(), command(name, "two")) for name in grids]
    mp.start_processes(_as_torchrun_rank, args=(2, commands), nprocs=2, start_method="spawn")
    worst = 0.0
    for name in grids:
        one, two = (_csv(tmp_path / procs / name / "grid.csv") for procs in ("one", "two"))
        fields = ("checkpoint", "key", "train_images", "guidance", "num_samples", "seeds")
        assert [[r[f] for f in fields] for r in one] == [[r[f] for f in fields] for r in two]
        for a, b in zip(one, two, strict=True):
            rel = abs(float(a["value"]) - float(b["value"])) / abs(float(a["value"]))
            assert rel < 1e-6, (a["key"], a["value"], b["value"])
            worst = max(worst, rel)
    assert len(_csv(tmp_path / "one" / "fd" / "grid.csv")) == 4
    with capsys.disabled():
        print(f"\n1 vs 2 processes: largest relative difference {worst:.2e}")
