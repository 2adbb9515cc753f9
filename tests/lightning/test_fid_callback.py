"""FIDCallback and the digits classifier: per-sample seeds, 1 vs 2 processes, keys, CSV, mosaic.

The DDP runs train the tiny digits UNet for 4 steps with lr = 0, so that one and two processes hold the
same weights (two processes see other batches and noise, so trained weights would differ); N = 61 is
not divisible by the world size.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from diffusionflow.checkpoint import build_module
from diffusionflow.lightning.fid_callback import FIDCallback
from diffusionflow.metrics.digits_classifier import DigitsClassifier
from diffusionflow.metrics.extractors import to_uint8
from diffusionflow.metrics.fid import format_count, metric_key
from diffusionflow.metrics.generate import generate_batches, nfe_of, parse_samplers, shard
from diffusionflow.train import train
from train.conftest import compose_train

N, BATCH = 61, 16
KEY = "fd_digits/61_heun5_ema"


class RecordingFIDCallback(FIDCallback):
    """Appends, per evaluation and rank, the indices this rank generated; notes each mosaic it logs."""

    def evaluate(self, trainer, pl_module):
        metrics = super().evaluate(trainer, pl_module)
        if metrics:
            path = Path(trainer.default_root_dir) / f"indices_rank{trainer.global_rank}.jsonl"
            with path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "indices": self.generated_indices}) + "\n")
        return metrics

    def _log_mosaic(self, trainer, images):
        super()._log_mosaic(trainer, images)
        with (Path(trainer.default_root_dir) / "mosaics.txt").open("a") as f:
            f.write(f"{trainer.global_step} {len(images)}\n")


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out: Path, cache_dir: Path, *overrides: str) -> dict[str, float]:
    cfg = compose_train(
        [
            "experiment=digits_unet",
            "trainer.max_steps=4",
            "model.optimizer.lr=0",
            "callbacks.final_eval.num_samples=16",
            f"callbacks.fd_digits.cache_dir={cache_dir}",
            f"callbacks.fd_digits.num_samples={N}",
            f"callbacks.fd_digits.batch_size={BATCH}",
            "callbacks.fd_digits.samplers=[{name: heun, steps: 3}]",
            "callbacks.fd_digits.every_n_steps=2",
            f"callbacks.fd_digits._target_={__name__}.RecordingFIDCallback",
            *overrides,
        ],
        out,
    )
    try:
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """One process (with a TensorBoard logger) and two (ddp_spawn), same seeds and weights."""
    out = {"one": tmp_path_factory.mktemp("one"), "two": tmp_path_factory.mktemp("two")}
    _run(out["one"], cache_dir, "logger=tensorboard")
    _run(out["two"], cache_dir, "trainer=ddp_sim")
    return out


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "eval" / "fid.csv").open() as f:
        return list(csv.DictReader(f))


def test_digits_classifier_is_accurate_and_cached(cache_dir, caplog):
    first = DigitsClassifier(cache_dir)
    assert first.test_accuracy > 0.95
    assert first.name == "digits-classifier-v1-seed0-r8" and first.metric_name == "fd_digits"
    with caplog.at_level(logging.INFO, logger="diffusionflow.metrics.digits_classifier"):
        second = DigitsClassifier(cache_dir)
    assert "cache hit" in caplog.text
    images = to_uint8(torch.rand(5, 1, 16, 16) * 2 - 1)
    assert torch.equal(first(images), second(images))
    assert first(images).shape == (5, first.feature_dim)
    with pytest.raises(ValueError, match="side"):
        first(to_uint8(torch.zeros(2, 1, 12, 12)))


def test_names_shards_and_samplers():
    assert [format_count(n) for n in (500, 1500, 10_000, 50_000)] == ["500", "1500", "10k", "50k"]
    assert metric_key("fid", 10_000, "heun", 35, "ema") == "fid/10k_heun35_ema"
    for n in (1, 5, 61, 64):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in shard(n, r, world)]
            assert got == list(range(n))
    heun, ddim = parse_samplers(["heun:3", {"name": "ddim", "steps": 4, "eta": 1.0}])
    assert (heun.steps, ddim.eta) == (3, 1.0)
    assert parse_samplers([("euler", 7)])[0].steps == 7
    cfg = compose_train([], Path("unused"))
    GlobalHydra.instance().clear()
    schedule = build_module(cfg).schedule
    assert (nfe_of(heun, schedule), nfe_of(ddim, schedule)) == (5, 4)
    with pytest.raises(ValueError, match="name:steps"):
        parse_samplers(["heun"])
    with pytest.raises(ValueError, match="unknown"):
        parse_samplers(["hune:3"])


@pytest.mark.parametrize("sampler", ["heun:3", "ddpm:4"])
def test_samples_do_not_depend_on_batching(sampler):
    """Sample i is a function of its seed alone, also for a stochastic sampler (fresh noise per sample)."""
    module = build_module(compose_train(["data=digits", "backbone=unet_tiny"], Path("unused"))).eval()
    GlobalHydra.instance().clear()
    s = parse_samplers([sampler])[0]

    def samples(indices, batch):
        return torch.cat(
            [
                x
                for _, x in generate_batches(
                    module, indices, shape=(1, 8, 8), batch_size=batch, seed_offset=7, sampler=s
                )
            ]
        )

    together = samples(range(10), 10)
    torch.testing.assert_close(samples(range(10), 3), together, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(samples(range(6, 10), 4), together[6:], rtol=1e-5, atol=1e-5)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="num_samples=1"):
        FIDCallback(extractor=lambda: None, num_samples=1)
    with pytest.raises(ValueError, match="every_n_steps=0"):
        FIDCallback(extractor=lambda: None, every_n_steps=0)
    with pytest.raises(ValueError, match="reference='nowhere.npz'"):
        FIDCallback(extractor=lambda: None, reference="nowhere.npz")
    with pytest.raises(ValueError, match="name:steps"):
        FIDCallback(extractor=lambda: None, samplers=["heun"])


@pytest.mark.slow
def test_two_processes_give_the_one_process_value(runs):
    one, two = _rows(runs["one"]), _rows(runs["two"])
    assert (
        [(r["step"], r["key"]) for r in one]
        == [(r["step"], r["key"]) for r in two]
        == [
            ("2", KEY),
            ("4", KEY),
        ]
    )
    for a, b in zip(one, two, strict=True):
        rel = abs(float(a["value"]) - float(b["value"])) / float(a["value"])
        print(f"{a['key']} step {a['step']}: 1 process {a['value']}, 2 processes {b['value']}, rel {rel:.2e}")
        assert rel < 1e-6
        assert int(a["num_samples"]) == int(b["num_samples"]) == N  # the all-reduced count


@pytest.mark.slow
def test_every_index_is_generated_once(runs):
    per_rank = [
        [json.loads(line) for line in (runs["two"] / f"indices_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert [e["step"] for e in per_rank[0]] == [e["step"] for e in per_rank[1]] == [2, 4]
    for rank0, rank1 in zip(*per_rank, strict=True):
        assert (len(rank0["indices"]), len(rank1["indices"])) == (30, 31)
        assert sorted(rank0["indices"] + rank1["indices"]) == list(range(N))


@pytest.mark.slow
def test_keys_csv_and_mosaic(runs):
    one = runs["one"]
    rows = _rows(one)
    assert rows[0]["seeds"] == "0-60" and rows[0]["weights"] == "ema"
    assert (rows[0]["sampler"], rows[0]["steps"], rows[0]["nfe"]) == ("heun", "3", "5")
    reference = json.loads(rows[0]["reference"])
    assert reference == {
        "count": 1500,
        "dataset": "Digits(n_train=1500,split_seed=0,upscale=bilinear)",
        "extractor": "digits-classifier-v1-seed0-r8",
        "resolution": 8,
        "split": "train",
    }
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics[KEY] == pytest.approx(float(rows[-1]["value"]), rel=1e-12)
    assert (one / "samples_mosaic.png").is_file()
    assert (one / "mosaics.txt").read_text().splitlines() == ["2 61"]  # once, at the first evaluation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(one / "tensorboard")).Reload()
    assert "samples_mosaic" in events.Tags()["images"]
    assert [e.step for e in events.Scalars(KEY)] == [2, 4]
    two = runs["two"]
    assert (two / "mosaics.txt").read_text().splitlines() == ["2 30"]  # rank 0 only, its own shard


def test_configs_compose_and_build(tmp_path, cache_dir, monkeypatch):
    """digits_unet carries fd_digits (500 samples, when training ends); fid.yaml adds on the command line
    and, without Inception weights, stops in setup, before training, naming the file to fetch."""
    cfg = compose_train(["experiment=digits_unet"], tmp_path)
    GlobalHydra.instance().clear()
    node = cfg.callbacks.fd_digits
    assert (node.num_samples, node.every_n_epochs, node.on_train_end) == (500, None, True)
    callback = instantiate(node)
    assert isinstance(callback, FIDCallback) and callback.num_samples == 500
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    overrides = ["+callbacks@callbacks.fid=fid", f"callbacks.fd_digits.cache_dir={cache_dir}"]
    cfg = compose_train(["experiment=digits_unet", *overrides], tmp_path)
    GlobalHydra.instance().clear()
    with pytest.raises(FileNotFoundError, match="python -m diffusionflow.evaluate prefetch"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
