"""The post-hoc EMA callback on tiny runs: its averages are the power-function profiles of the raw weights,
snapshots are written where and when stated, ``weights=sigma_rel:<x>`` loads, a resumed run continues the
same profiles, and bad input is refused before any work."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer

import diffusionflow.checkpoint as checkpoint
from diffusionflow.checkpoint import build_module, check_posthoc, check_weights, load_module
from diffusionflow.core.posthoc_ema import gamma_of_sigma_rel
from diffusionflow.errors import ConfigError
from diffusionflow.lightning.checkpoint_io import AtomicCheckpointIO
from diffusionflow.lightning.finite_guard import NonFiniteError
from diffusionflow.lightning.posthoc_snapshots import SNAPSHOT_DIR, STATE_KEY, PostHocEMA, snapshot_name
from diffusionflow.train import train
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

# 96 points in batches of 16 (6 steps per epoch, 16 images per step), a tiny MLP; snapshots every 2 steps
TINY = [
    "data.train_dataset.n=96",
    "data.batch_size=16",
    "backbone.width=32",
    "backbone.depth=2",
    "backbone.emb_dim=16",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "++callbacks.final_eval.num_samples=16",
    "+callbacks@callbacks.posthoc_ema=posthoc_ema",
    "callbacks.posthoc_ema.snapshot_every_n_steps=2",
]
SIGMA_RELS, STEPS, BATCH = (0.05, 0.1), (2, 4, 6, 8), 16


def _run(out: Path, *overrides: str) -> dict[str, float]:
    return train(compose_train([*TINY, *overrides], out))


def _snapshots(out: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((out / SNAPSHOT_DIR).iterdir())}


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _run(out, "trainer.max_steps=8")
    return out


def test_snapshots_are_written_with_their_profile(straight):
    snapshots = _snapshots(straight)
    assert set(snapshots) == {snapshot_name(s, r) for s in STEPS for r in SIGMA_RELS}
    ckpt = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    for name, snap in snapshots.items():
        assert snap["sigma_rel"] in SIGMA_RELS and snap["gamma"] == gamma_of_sigma_rel(snap["sigma_rel"])
        assert name == snapshot_name(snap["step"], snap["sigma_rel"])
        assert snap["t_images"] == snap["step"] * BATCH  # one rank, no accumulation
        assert snap["state_dict"].keys() == ckpt["state_dict"].keys()
    assert ckpt["callbacks"][STATE_KEY]["t_images"] == 8 * BATCH
    assert not list((straight / SNAPSHOT_DIR).glob(".*.tmp"))  # written atomically, nothing left over


def test_load_module_with_a_posthoc_width(straight):
    last = straight / "checkpoints" / "last.ckpt"
    check_posthoc(last, 0.1)
    check_posthoc(last, 0.075)
    tracked = _backbone(_snapshots(straight)[snapshot_name(8, 0.1)]["state_dict"])
    module = load_module(last, "sigma_rel:0.1")  # a tracked width at its last snapshot: that snapshot
    for k, v in module.backbone.state_dict().items():
        torch.testing.assert_close(v, tracked[k], rtol=1e-5, atol=1e-6)
    between = load_module(last, "sigma_rel:0.075").backbone.state_dict()
    ema = load_module(last, "ema").backbone.state_dict()
    assert any(not torch.allclose(between[k], tracked[k]) for k in tracked)
    assert any(not torch.allclose(between[k], ema[k]) for k in tracked)


def test_resume_continues_the_same_profiles(straight, tmp_path):
    """4 steps, then ``resume=auto`` to 8 in the same folder, against 8 straight: every snapshot (profile
    values, t, step) bit-equal. CPU training of this config is bit-reproducible across a resume
    (``tests/train/test_resume.py``), and the averages and counters are restored exactly from
    ``last.ckpt``, so the same float operations run on the same numbers."""
    resumed = tmp_path / "resumed"
    _run(resumed, "trainer.max_steps=4", "resume=auto")
    shutil.copy(resumed / "checkpoints" / "last.ckpt", tmp_path / "at_step_4.ckpt")
    _run(resumed, "trainer.max_steps=8", "resume=auto")
    a, b = _snapshots(straight), _snapshots(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert {k: v for k, v in a[name].items() if k != "state_dict"} == {
            k: v for k, v in b[name].items() if k != "state_dict"
        }
        for key, value in a[name]["state_dict"].items():
            assert torch.equal(value, b[name]["state_dict"][key]), (name, key)

    # the step-4 checkpoint reconstructs from the snapshots up to its step only, at its t
    early = resumed / "checkpoints" / "at_step_4.ckpt"
    shutil.copy(tmp_path / "at_step_4.ckpt", early)
    at_4 = _backbone(b[snapshot_name(4, 0.1)]["state_dict"])
    for k, v in load_module(early, "sigma_rel:0.1").backbone.state_dict().items():
        torch.testing.assert_close(v, at_4[k], rtol=1e-5, atol=1e-6)

    # refused by the resume policy before training (the callback's own check is the second line of defence)
    with pytest.raises(
        ConfigError, match=r"callbacks\.posthoc_ema\.sigma_rels: \[0\.05, 0\.1\] → \[0\.05, 0\.2\]"
    ):
        _run(resumed, "trainer.max_steps=10", "resume=auto", "callbacks.posthoc_ema.sigma_rels=[0.05,0.2]")


class Recorder(Callback):
    """The floating weights after every optimizer step."""

    def __init__(self) -> None:
        self.raw: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.raw.append({k: v.clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()})


class SaveAt(Callback):
    """Saves a checkpoint at the end of step ``step``, before the callbacks after it have run (as the
    SLURM requeue of ``callbacks.interrupt``, ordered before ``posthoc_ema`` in the configs, does)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(out: Path, callbacks: list[Callback], ckpt_path: Path | None = None) -> None:
    cfg = compose_train(TINY, out)
    GlobalHydra.instance().clear()
    trainer = Trainer(
        max_steps=5,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data), ckpt_path=ckpt_path)


def test_averages_are_the_power_function_profiles_and_survive_a_checkpoint_saved_before_them(tmp_path):
    """θ̂ at step K = Σ_j w_j θ_j with w_j = (j^{γ+1} − (j−1)^{γ+1}) / K^{γ+1} (the profile over each step),
    for the raw weights θ_j recorded after each step. A checkpoint saved at step 3 before this callback's
    update of step 3 holds its state of step 2; resuming from it does the missed update from the restored
    weights (those of step 3), and the final snapshots equal the uninterrupted run's bit for bit."""
    recorder, saved = Recorder(), tmp_path / "saved.ckpt"
    _fit(tmp_path / "a", [recorder, SaveAt(3, saved), PostHocEMA(SIGMA_RELS, snapshot_every_n_steps=None)])
    assert torch.load(saved, weights_only=True)["callbacks"][STATE_KEY]["step"] == 2  # before the update
    _fit(tmp_path / "b", [PostHocEMA(SIGMA_RELS, snapshot_every_n_steps=None)], ckpt_path=saved)
    a, b = _snapshots(tmp_path / "a"), _snapshots(tmp_path / "b")
    assert set(a) == {snapshot_name(5, r) for r in SIGMA_RELS}
    K = len(recorder.raw)
    for sigma_rel in SIGMA_RELS:
        name = snapshot_name(K, sigma_rel)
        g = gamma_of_sigma_rel(sigma_rel) + 1
        w = [(j**g - (j - 1) ** g) / K**g for j in range(1, K + 1)]
        for key, value in a[name]["state_dict"].items():
            if value.is_floating_point():
                expected = sum(wj * raw[key].double() for wj, raw in zip(w, recorder.raw, strict=True))
                torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
            assert torch.equal(value, b[name]["state_dict"][key]), key


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("callbacks.posthoc_ema.sigma_rels=[0.5]", r"sigma_rel=0.5 .*allowed: 0 < sigma_rel < 0.3003"),
        ("callbacks.posthoc_ema.sigma_rels=[0.05,0.05]", r"sigma_rels=\[0.05, 0.05\]: allowed .* distinct"),
        ("callbacks.posthoc_ema.snapshot_every_n_steps=0", r"snapshot_every_n_steps=0"),
    ],
)
def test_bad_callback_settings_fail_before_training(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        _run(tmp_path, override)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / SNAPSHOT_DIR).exists()


def test_unreachable_widths_are_refused_before_any_weights_are_loaded(straight, monkeypatch):
    last = straight / "checkpoints" / "last.ckpt"

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(checkpoint, "reconstruct", loaded)
    monkeypatch.setattr(checkpoint, "build_module", loaded)
    residual = (
        r"sigma_rel=0.001 is outside what the stored EMA profiles can reconstruct: from 8 snapshots of "
        r"sigma_rel \[0.05, 0.1\] up to t=128 images its relative L2 residual is 0\.\d+ > 0.05; "
        r"reconstructable: sigma_rel about 0\.0\d+ to 0\.\d+"
    )
    for call in (lambda: load_module(last, "sigma_rel:0.001"), lambda: check_posthoc(last, 0.001)):
        with pytest.raises(ConfigError, match=residual):
            call()
    monkeypatch.setattr(checkpoint, "read_checkpoint", loaded)  # a width no profile has: refused unread
    for call in (lambda: load_module(last, "sigma_rel:0.5"), lambda: check_posthoc(last, 0.5)):
        with pytest.raises(
            ConfigError, match=r"weights='sigma_rel:0.5': allowed 'sigma_rel:<x>' .* < 0.3003"
        ):
            call()


def test_a_run_without_snapshots_is_named(straight, tmp_path):
    elsewhere = tmp_path / "run" / "checkpoints" / "last.ckpt"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "last.ckpt", elsewhere)
    folder = tmp_path / "run" / SNAPSHOT_DIR
    match = rf"no snapshots up to its step 8 in {folder}; .*needs a run trained with callbacks.posthoc_ema"
    for call in (lambda: load_module(elsewhere, "sigma_rel:0.1"), lambda: check_posthoc(elsewhere, 0.1)):
        with pytest.raises(ConfigError, match=match):
            call()


def test_weights_values():
    for ok in ("ema", "raw", "sigma_rel:0.1", "sigma_rel:0.25"):
        check_weights(ok)
    with pytest.raises(
        ConfigError, match=r"weights='best' is unknown; allowed: \['ema', 'raw'\] or 'sigma_rel:<x>'"
    ):
        check_weights("best")
    for bad in ("sigma_rel:abc", "sigma_rel:", "sigma_rel:nan", "sigma_rel:0"):
        with pytest.raises(ConfigError, match=rf"weights='{bad}': allowed 'sigma_rel:<x>' with a number"):
            check_weights(bad)


def test_a_non_finite_snapshot_is_never_written(tmp_path):
    """As for checkpoints: a profile holding a NaN is not written (the finite one before it is)."""
    module = torch.nn.Linear(2, 2)
    callback = PostHocEMA(SIGMA_RELS)
    callback.averages = [{k: v.detach().clone() for k, v in module.state_dict().items()} for _ in SIGMA_RELS]
    callback.averages[1]["weight"][0, 0] = float("nan")
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path))
    with pytest.raises(
        NonFiniteError, match=r"refusing to write .*ema-00000000-0.1.pt: state_dict\['weight'\]"
    ):
        callback._write(trainer, module)
    assert [p.name for p in (tmp_path / SNAPSHOT_DIR).iterdir()] == [snapshot_name(0, 0.05)]
