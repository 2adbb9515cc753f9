"""One construction path: canonical resolved once, every component built from its node, needs supplied."""

from __future__ import annotations

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from diffusionflow.config import ConfigError, build_components, resolve
from diffusionflow.core import predictions, proposals, schedules, weightings
from diffusionflow.core.components import KINDS, REGISTRIES, canonical, component
from diffusionflow.core.registry import Registry
from diffusionflow.paths import CONFIG_DIR
from diffusionflow.train import train
from train.conftest import compose_train

PAPERS = ["elbo", "iddpm", "edm", "sd3", "flow", "cosine_v", "sigmoid", "min_snr"]


@pytest.mark.parametrize("name", PAPERS)
def test_resolve_names_the_papers_components(tmp_path, name):
    cfg = compose_train([f"weighting={name}"], tmp_path)
    resolved = resolve(cfg)
    w = weightings.build(name)
    for kind, registry in (("schedule", schedules.SCHEDULES), ("prediction", predictions.PREDICTIONS)):
        cls = registry[getattr(w.canonical(), kind)]
        assert resolved[kind]._target_ == f"{cls.__module__}.{cls.__qualname__}"
        assert "name" not in resolved[kind]
    assert resolved.proposal._target_.endswith(proposals.PROPOSALS[w.canonical().proposal].__qualname__)
    assert resolve(resolved) == resolved  # idempotent
    assert cfg.schedule.name == "canonical"  # the input is not modified
    built, again = build_components(cfg), build_components(resolved)
    assert all(repr(getattr(built, k)) == repr(getattr(again, k)) for k in KINDS)


def test_options_beside_canonical_override_the_papers(tmp_path):
    cfg = compose_train(["weighting=edm", "+prediction.sigma_data=0.25", "+schedule.shift=2.0"], tmp_path)
    resolved = resolve(cfg)
    assert resolved.prediction.sigma_data == 0.25 and resolved.schedule.shift == 2.0
    parts = build_components(cfg)
    assert parts.prediction.sigma_data == 0.25 and parts.schedule.shift == 2.0


def test_needs_are_supplied_from_the_run(tmp_path):
    parts = build_components(compose_train(["weighting=sd3", "proposal=weighting"], tmp_path))
    assert parts.proposal.weighting is parts.weighting
    parts = build_components(compose_train(["schedule=linear", "proposal=uniform_t"], tmp_path))
    assert parts.proposal.schedule is parts.schedule
    named = build_components(compose_train(["proposal=uniform_t", "proposal.schedule=cosine"], tmp_path))
    assert (
        isinstance(named.proposal.schedule, schedules.Cosine)
        and named.proposal.schedule is not named.schedule
    )


def test_every_group_option_builds_through_the_one_path(tmp_path):
    for kind in KINDS:
        for path in sorted((CONFIG_DIR / kind).glob("*.yaml")):
            cfg = compose_train([f"{kind}={path.stem}"], tmp_path)
            if kind == "prediction" and path.stem == "eps":
                cfg.sampler.grid = "edm"  # ε-prediction cannot start where α = 0
            assert isinstance(getattr(build_components(cfg), kind), tuple(REGISTRIES[kind].values()))


def test_a_target_of_another_kind_is_refused(tmp_path):
    cfg = compose_train([], tmp_path)
    cfg.schedule = OmegaConf.create({"_target_": "diffusionflow.core.samplers.Heun"})
    with pytest.raises(
        ConfigError, match=r"schedule._target_=diffusionflow.core.samplers.Heun is not a schedule"
    ):
        build_components(cfg)
    cfg.schedule = OmegaConf.create({"_target_": "diffusionflow.core.schedules.Cosin"})
    with pytest.raises(
        ConfigError, match=r"schedule._target_=diffusionflow.core.schedules.Cosin: not importable"
    ):
        build_components(cfg)


def test_canonical_is_defined_for_the_three_kinds_a_weighting_fixes():
    w = weightings.build("edm")
    cls, options = canonical(w, "proposal")
    assert cls is proposals.LogNormal and options == {"P_mean": -1.2, "P_std": 1.2}
    with pytest.raises(ValueError, match="sampler=canonical is not defined"):
        canonical(w, "sampler")


def test_library_use_builds_what_the_config_builds(tmp_path):
    """The docstring example of core.components equals the config path."""
    run = {"weighting": component("weighting", "edm")}
    for kind in ("schedule", "prediction", "proposal"):
        run[kind] = component(kind, "canonical", run)
    run["sampler"] = component("sampler", "heun", run, steps=18)
    parts = build_components(compose_train(["weighting=edm", "sampler.steps=18"], tmp_path))
    assert all(repr(run[k]) == repr(getattr(parts, k)) for k in KINDS if k != "sampler")
    assert torch.equal(run["sampler"].times(run["schedule"]), parts.sampler.times(parts.schedule))


def test_registry_error_names_kind_value_and_allowed():
    reg = Registry("schedule", schedules.Cosine, schedules.Flow)
    assert list(reg) == ["cosine", "flow"] and reg["flow"] is schedules.Flow
    with pytest.raises(ValueError, match=r"schedule='cos' is unknown; allowed: \['cosine', 'flow'\]"):
        reg.build("cos")


def test_dry_run_writes_the_resolved_config_and_trains_nothing(train_cfg, tmp_path):
    assert train(train_cfg(["weighting=edm", "dry_run=true"])) == {}
    written = yaml.safe_load((tmp_path / "config_resolved.yaml").read_text())
    assert written["schedule"]["_target_"] == "diffusionflow.core.schedules.EDM"
    assert written["proposal"] == {
        "_target_": "diffusionflow.core.proposals.LogNormal",
        "P_mean": -1.2,
        "P_std": 1.2,
    }
    assert all("name" not in written[kind] for kind in ("schedule", "prediction", "proposal"))
    assert not (tmp_path / "checkpoints").exists()
