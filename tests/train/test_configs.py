"""Every config group option composes; the debug configs run; launcher configs set what SLURM needs."""

from __future__ import annotations

import pytest

from diffusionflow.paths import CONFIG_DIR
from diffusionflow.train import train
from train.conftest import compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in ("schedule", "prediction", "weighting", "proposal", "sampler", "logger", "trainer")
        for o in options(g)
    ]
    + [f"launcher={o}" for o in options("launcher")]
    + [f"experiment={o}" for o in options("experiment")],
)
def test_group_options_compose(tmp_path, override):
    cfg = compose_train([override], tmp_path)
    assert cfg.data.shape and cfg.model._target_.endswith("DiffusionModule")


def test_submitit_slurm_starts_one_task_per_gpu(tmp_path):
    cfg = compose_train(["launcher=submitit_slurm", "trainer.devices=4"], tmp_path)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4
    assert cfg.trainer.strategy == "ddp"


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_configs_run(tmp_path, debug):
    overrides = [f"debug={debug}", "data.train_dataset.n=4096"]
    if debug == "overfit":
        overrides.append("trainer.max_epochs=2")
    cfg = compose_train(overrides, tmp_path)
    assert cfg.task_name == "debug"
    train(cfg)
