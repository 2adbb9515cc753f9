"""Checkpoints are read from local files only, with ``torch.load(weights_only=True)``; a file that is not a
checkpoint gets our message, never torch's advice to retry with ``weights_only=False``, and no code in a
hostile pickle ever runs."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Trainer

from diffusionflow.checkpoint import build_module, check_ckpt_path, load_module
from diffusionflow.errors import ConfigError
from diffusionflow.lightning import checkpoint_io
from diffusionflow.lightning.checkpoint_io import AtomicCheckpointIO
from diffusionflow.train import train
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

URLS = [
    "http://example.invalid/last.ckpt",
    "https://example.invalid/x.ckpt",
    "s3://bucket/x.ckpt",
    "registry:m",
]
NOT_A_CHECKPOINT = "is not a checkpoint of diffusionflow.train"


class Hostile:
    """Unpickling it would create the file ``marker`` (``os.system`` would do anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return (os.mkdir, (str(self.marker),))


def _train(out: Path, overrides: list[str]) -> dict[str, float]:
    try:
        return train(compose_train(overrides, out))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Files that are not checkpoints, each beside the marker its unpickling would create."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = folder / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}, "hyper_parameters": {"config": {"a": 1}}}, good)
    files = {
        "garbage": b"\x93NUMPY this is not a checkpoint \x00\x01\x02",
        "empty": b"",
        "truncated": good.read_bytes()[: len(good.read_bytes()) // 2],
        "pickle_with_code": pickle.dumps({"state_dict": Hostile(folder / "marker_pickle")}),
    }
    for name, data in files.items():
        (folder / f"{name}.ckpt").write_bytes(data)
    torch.save({"state_dict": Hostile(folder / "marker_torch")}, folder / "torch_with_code.ckpt")
    torch.save([torch.ones(2)], folder / "a_list.ckpt")
    return {p.stem: p for p in folder.glob("*.ckpt") if p.stem != "good"}


@pytest.mark.parametrize("url", URLS)
def test_urls_are_refused_before_any_work(url):
    with pytest.raises(ConfigError, match=f"ckpt_path={url} is not a local file"):
        check_ckpt_path(url)
    with pytest.raises(ConfigError, match="not a local file"):
        AtomicCheckpointIO().load_checkpoint(url)
    with pytest.raises(ConfigError, match="not a local file"):
        load_module(url)


def test_local_paths_pass_the_url_check(tmp_path):
    for path in (None, tmp_path / "last.ckpt", "logs/http_runs/last.ckpt", "last"):
        check_ckpt_path(path)


def _fit(tmp_path: Path, ckpt_path: str | Path) -> None:
    """``Trainer.fit(ckpt_path=...)`` on the default toy config with our checkpoint plugin, as ``train``
    builds it (``train`` itself also reads the checkpoint for its resume checks first)."""
    try:
        cfg = compose_train([], tmp_path)
        trainer = Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=tmp_path,
        )
        trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data), ckpt_path=ckpt_path)
    finally:
        GlobalHydra.instance().clear()


def test_fit_from_a_url_is_refused_and_downloads_nothing(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        pytest.fail("a checkpoint URL was downloaded")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(ConfigError, match="ckpt_path=http://example.invalid/last.ckpt is not a local file"):
        _fit(tmp_path, "http://example.invalid/last.ckpt")


def test_files_that_are_not_checkpoints_get_our_message(bad_files):
    reasons = {}
    for name, path in bad_files.items():
        with pytest.raises(ConfigError) as error:
            load_module(path)
        message = str(error.value)
        assert message.startswith(f"ckpt_path={path} {NOT_A_CHECKPOINT}: "), message
        assert "weights_only" not in message and "trusted source" not in message, message
        assert error.value.__cause__ is None, name
        assert error.value.__suppress_context__ or error.value.__context__ is None, name
        reasons[name] = message.split(": ", 1)[1]
    assert "truncated" in reasons["truncated"] and "truncated" in reasons["empty"]
    assert "objects other than tensors" in reasons["pickle_with_code"]
    assert "posix.mkdir" in reasons["torch_with_code"] or "mkdir" in reasons["torch_with_code"]
    assert reasons["a_list"] == "it holds a list, not a dict"
    assert not list(bad_files["garbage"].parent.glob("marker_*")), "a hostile pickle ran code"


def test_fit_from_a_file_that_is_not_a_checkpoint_gets_our_message(bad_files, tmp_path):
    for name in ("pickle_with_code", "torch_with_code", "truncated", "garbage"):
        with pytest.raises(ConfigError, match=f"{NOT_A_CHECKPOINT}: ") as error:
            _fit(tmp_path / name, bad_files[name])
        assert "weights_only" not in str(error.value)
    assert not list(bad_files["garbage"].parent.glob("marker_*")), "a hostile pickle ran code"


def test_resume_reads_through_weights_only(tmp_path, monkeypatch):
    """``train``'s resume: Lightning reads the checkpoint through our plugin, and every ``torch.load`` of
    it (ours and the resume checks') is ``weights_only=True``."""
    _train(tmp_path, ["trainer.max_steps=2"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    loads, reads = [], []
    real_load, real_read = torch.load, checkpoint_io.read_checkpoint

    def spy_load(*args, **kwargs):
        if isinstance(args[0], str | Path):
            loads.append((Path(args[0]), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    def spy_read(path, *args, **kwargs):
        reads.append(Path(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(checkpoint_io, "read_checkpoint", spy_read)
    _train(tmp_path, ["trainer.max_steps=3", f"ckpt_path={last}"])
    assert reads == [last] and (last, True) in loads
    assert all(weights_only is True for path, weights_only in loads if path == last), loads
    assert torch.load(last, weights_only=True)["global_step"] == 3
