"""Every config group option composes; the debug configs run; launcher configs set what SLURM needs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

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


WEIGHTING_SWEEP = ["edm", "sd3", "flow", "cosine_v", "sigmoid", "elbo"]


@pytest.mark.parametrize("preset", ["weightings_toy2d", "weightings_digits", "weightings_cifar10"])
def test_weighting_sweep_presets(tmp_path, preset):
    """Six weightings × 3 seeds, each weighting with its paper's setup (the canonical groups)."""
    cfg = compose_train([f"sweep={preset}"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert params.weighting.split(",") == WEIGHTING_SWEEP and params.seed.split(",") == ["0", "1", "2"]
    assert {cfg.schedule.name, cfg.prediction.name, cfg.proposal.name} == {"canonical"}
    dataset = {"weightings_toy2d": "Toy2D", "weightings_digits": "Digits", "weightings_cifar10": "CIFAR10"}
    assert cfg.data.train_dataset._target_.endswith(dataset[preset])
    for w in WEIGHTING_SWEEP:  # every job of the sweep composes
        assert compose_train([f"sweep={preset}", f"weighting={w}", "seed=2"], tmp_path).seed == 2


def test_invariance_preset_crosses_proposals_with_flow_and_cosine_v(tmp_path):
    cfg = compose_train(["sweep=invariance_toy2d"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert params.weighting == "flow,cosine_v" and len(params.proposal.split(",")) == 3
    for p in params.proposal.split(","):
        compose_train(["sweep=invariance_toy2d", "weighting=cosine_v", f"proposal={p}"], tmp_path)


def test_samplers_nfe_preset_composes_with_sample(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("sample", overrides=["sweep=samplers_nfe", "oracle=blog"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = cfg.hydra.sweeper.params
    assert set(params.sampler.split(",")) <= set(options("sampler"))
    assert [int(s) for s in params["sampler.steps"].split(",")] == [2, 4, 8, 16, 32]


def test_optuna_preset_searches_the_sigmoid_bias(tmp_path):
    cfg = compose_train(["hparams_search=sigmoid_bias_optuna"], tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.params["weighting.b"].startswith("interval(")
    assert cfg.weighting._target_.endswith("Sigmoid") and cfg.optimized_metric == "final/sliced_w2"
