"""Long runs that survive a cluster: ``resume=auto`` in the run folder, exact mid-epoch resume, the
config-change policy, ``last.ckpt`` in a copied folder, and the multi-node SLURM composition."""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from diffusionflow.config import ConfigError
from diffusionflow.lightning.datamodule import per_rank_batch_size
from diffusionflow.lightning.module import step_seed
from diffusionflow.lightning.resume import (
    changed_keys,
    check_config_change,
    find_newest_checkpoint,
    resolve_ckpt_path,
)
from diffusionflow.train import train
from train.conftest import compose_train

# 96 points in batches of 16: 6 batches per epoch; a checkpoint every 2 steps; a tiny MLP
TINY = [
    "data.train_dataset.n=96",
    "data.batch_size=16",
    "backbone.width=32",
    "backbone.depth=2",
    "backbone.emb_dim=16",
    "proposal=adaptive",  # a proposal with state of its own in the checkpoint
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "++callbacks.final_eval.num_samples=16",
]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets on a busy 2-core machine


def _run(out: Path, *overrides: str) -> dict[str, float]:
    return train(compose_train([*TINY, *overrides], out))


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _loss_rows(out: Path) -> list[tuple[int, str]]:
    with (out / "csv" / "metrics.csv").open() as f:
        return [(int(r["step"]), r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def test_mid_epoch_resume_in_place_gives_the_same_weights_and_keeps_the_history(tmp_path):
    """8 steps straight against 4 steps (mid-epoch: batch 4 of 6) + ``resume=auto`` to 8 in the same
    folder: raw and EMA weights bit-equal, every step's loss equal, the CSV holds both parts."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, "trainer.max_steps=8")
    _run(resumed, "trainer.max_steps=4", "resume=auto")
    assert _ckpt(resumed / "checkpoints" / "last.ckpt")["global_step"] == 4  # 4 % 6: mid-epoch
    _run(resumed, "trainer.max_steps=8", "resume=auto")

    a, b = _ckpt(straight / "checkpoints" / "last.ckpt"), _ckpt(resumed / "checkpoints" / "last.ckpt")
    assert b["global_step"] == 8
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # the history: steps 0-3 of the first part kept, 4-7 appended, each loss the uninterrupted run's
    assert [s for s, _ in _loss_rows(resumed)] == list(range(8))
    assert _loss_rows(resumed) == _loss_rows(straight)
    (entry,) = [json.loads(line) for line in (resumed / "resumes.jsonl").read_text().splitlines()]
    assert entry["global_step"] == 4
    assert entry["changed"]["trainer.max_steps"] == [4, 8]  # an allowed change, applied and recorded


def test_resume_in_a_copied_folder_keeps_last_ckpt_current(tmp_path):
    """A run folder copied elsewhere and resumed there overwrites its ``last.ckpt`` (no ``last-v1``),
    which is what ``sample``, ``compare`` and the next resume read."""
    first, copy = tmp_path / "first", tmp_path / "copy"
    _run(first, "trainer.max_steps=2")
    shutil.copytree(first, copy)
    _run(copy, "trainer.max_steps=4", "resume=auto")
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names, names
    assert _ckpt(copy / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert find_newest_checkpoint(copy) in {copy / "checkpoints" / n for n in names}
    assert _ckpt(find_newest_checkpoint(copy))["global_step"] == 4
    assert _ckpt(first / "checkpoints" / "last.ckpt")["global_step"] == 2  # the original untouched


def test_changed_learning_rate_is_refused_before_training(tmp_path):
    """The optimizer state would be restored while the stored config claims the new lr: refused, with
    key, old and new value, before anything in the folder changes."""
    _run(tmp_path, "trainer.max_steps=2")
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"model\.optimizer\.lr: 0\.001 → 0\.5") as err:
        _run(tmp_path, "trainer.max_steps=4", "resume=auto", "model.optimizer.lr=0.5")
    assert "trainer.max_steps" not in str(err.value)  # allowed changes are not listed
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "resumes.jsonl").exists()


def test_resume_auto_in_an_empty_folder_starts_fresh(tmp_path):
    _run(tmp_path, "trainer.max_steps=2", "resume=auto")
    assert _ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert [s for s, _ in _loss_rows(tmp_path)] == [0, 1]
    assert not (tmp_path / "resumes.jsonl").exists()


def _fake(path: Path, step: int, mtime: float | None = None, **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step, "loops": {}, **extra}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_newest_valid_checkpoint_skips_broken_files(tmp_path):
    """Largest global_step wins over names and times; SLURM's hpc_ckpt_* count; a truncated file, a
    non-torch file and a dict without loop state are skipped, each with a warning naming it."""
    _fake(tmp_path / "checkpoints" / "last.ckpt", 4)
    _fake(tmp_path / "checkpoints" / "step_0000002.ckpt", 2)
    hpc = _fake(tmp_path / "hpc_ckpt_1.ckpt", 6)
    truncated = tmp_path / "checkpoints" / "step_0000008.ckpt"
    data = _fake(tmp_path / "tmp.ckpt", 8).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "hpc_ckpt_2.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}, "global_step": 9}, no_loops := tmp_path / "checkpoints" / "weights.ckpt")
    with pytest.warns(UserWarning) as record:
        assert find_newest_checkpoint(tmp_path) == hpc
    text = " ".join(str(w.message) for w in record)
    for bad in (truncated, garbage, no_loops):
        assert str(bad) in text, bad
    assert find_newest_checkpoint(tmp_path / "nothing_here") is None


def test_equal_steps_go_to_the_newest_file(tmp_path):
    old = _fake(tmp_path / "checkpoints" / "last.ckpt", 4, mtime=1_000_000)
    new = _fake(tmp_path / "hpc_ckpt_1.ckpt", 4, mtime=2_000_000)
    assert find_newest_checkpoint(tmp_path) == new
    os.utime(old, (3_000_000, 3_000_000))
    assert find_newest_checkpoint(tmp_path) == old


def test_explicit_ckpt_path_and_bad_resume_values(tmp_path):
    newest = _fake(tmp_path / "checkpoints" / "last.ckpt", 4)
    assert resolve_ckpt_path("auto", None, tmp_path) == str(newest)
    assert resolve_ckpt_path("auto", "other.ckpt", tmp_path) == "other.ckpt"  # explicit wins
    assert resolve_ckpt_path(None, None, tmp_path) is None  # no resume unless asked
    with pytest.raises(ConfigError, match=r"resume='yes' is unknown; allowed: null .* or 'auto'"):
        resolve_ckpt_path("yes", None, tmp_path)


def test_config_change_policy(tmp_path):
    """Refused: what restored state overrides (model, EMA, proposal …), data, seed, sampler. Allowed
    and returned: trainer limits, loaders' workers, the data's location, other callbacks; hydra ignored."""
    old = {
        "seed": 0,
        "model": {"optimizer": {"lr": 1e-3}, "compile": False},
        "data": {"batch_size": 32, "num_workers": 0, "train_dataset": {"root": "/a", "n": 5}},
        "callbacks": {"ema": {"half_life_images": 10}, "model_checkpoint": {"every_n_train_steps": 2}},
        "sampler": {"steps": 4},
        "trainer": {"max_steps": 4},
        "hydra": {"run": {"dir": "/x"}},
    }
    path = _fake(tmp_path / "c.ckpt", 4, hyper_parameters={"config": old})
    allowed = json.loads(json.dumps(old))
    allowed["trainer"]["max_steps"] = 8
    allowed["data"]["num_workers"] = 4
    allowed["data"]["train_dataset"]["root"] = "/b"
    allowed["model"]["compile"] = True
    allowed["callbacks"]["model_checkpoint"]["every_n_train_steps"] = 5
    allowed["hydra"]["run"]["dir"] = "/y"
    assert check_config_change(path, allowed) == {
        "callbacks.model_checkpoint.every_n_train_steps": (2, 5),
        "data.num_workers": (0, 4),
        "data.train_dataset.root": ("/a", "/b"),
        "model.compile": (False, True),
        "trainer.max_steps": (4, 8),
    }
    for key, value in [
        ("seed", 1),
        ("data.batch_size", 64),
        ("data.train_dataset.n", 6),
        ("callbacks.ema.half_life_images", 20),
        ("sampler.steps", 8),
    ]:
        new = json.loads(json.dumps(old))
        *parents, leaf = key.split(".")
        node = new
        for p in parents:
            node = node[p]
        old_value, node[leaf] = node[leaf], value
        with pytest.raises(ConfigError, match=rf"{key}: {old_value!r} → {value!r}"):
            check_config_change(path, new)
    removed = json.loads(json.dumps(old))
    del removed["callbacks"]["ema"]  # callbacks=none on resume: the EMA state would be dropped
    with pytest.raises(ConfigError, match=r"callbacks\.ema\.half_life_images: 10 → <absent>"):
        check_config_change(path, removed)
    assert changed_keys({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == {"a.b": ([1, 2], [1, 3])}


def test_imagenet64_runs_on_four_nodes_of_eight_gpus(tmp_path):
    """EDM's ImageNet-64 setup (4 DGX nodes × 8 A100, batch 4096): SLURM's node and task counts are the
    trainer's, through one interpolation each; 128 images per rank; 32 distinct step-seed streams."""
    cfg = compose_train(["launcher=submitit_slurm", "experiment=imagenet64_cond"], tmp_path, fast=False)
    assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes == 4
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == cfg.trainer.devices == 8
    assert cfg.resume == "auto"  # a requeued job continues in its folder
    world = cfg.trainer.num_nodes * cfg.trainer.devices
    assert cfg.data.batch_size == 4096
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divisible: no warning that the global batch changed
        assert per_rank_batch_size(cfg.data.batch_size, world) == 128
    for step in (0, 1, 610351):
        seeds = {step_seed(cfg.seed, rank, step, stream) for rank in range(world) for stream in (0, 1)}
        assert len(seeds) == 2 * world
    moved = compose_train(["launcher=submitit_slurm", "trainer.num_nodes=2"], tmp_path, fast=False)
    assert moved.hydra.launcher.nodes == 2  # one number to change, not two to keep in sync
    local = compose_train([], tmp_path, fast=False)
    assert local.trainer.num_nodes == 1 and local.resume is None


def test_several_nodes_without_a_cluster_fail_instead_of_waiting(tmp_path, monkeypatch):
    """``experiment=imagenet64_cond`` on a workstation: an error naming trainer.num_nodes, not ranks
    waiting for 3 nodes that never come."""
    for var in ("NODE_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2, .*allowed: launcher=submitit_slurm"):
        _run(tmp_path, "trainer.num_nodes=2")
    assert not (tmp_path / "checkpoints").exists()
