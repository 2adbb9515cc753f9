"""DiffusionDataModule: global batch, seeded loaders, checks, and the conf/data configs."""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from diffusionflow.config import ConfigError
from diffusionflow.data.toy2d import Toy2D
from diffusionflow.lightning.datamodule import DiffusionDataModule, ResumableDataLoader, per_rank_batch_size
from diffusionflow.paths import CONFIG_DIR

CONF = CONFIG_DIR / "data"
ON_DISK = ["cifar10", "imagenet32", "imagenet64", "latents", "imagenet256_latents"]
CONFIGS = ["toy2d", "moons", "rings", "checkerboard", "digits", "digits16", *ON_DISK]


def _toy_module(batch_size: int = 64, seed: int | None = 0, **kwargs) -> DiffusionDataModule:
    toy = partial(Toy2D, "moons", n=1000)
    return DiffusionDataModule(toy, batch_size=batch_size, shape=[2], num_classes=0, seed=seed, **kwargs)


@pytest.mark.parametrize(("world_size", "per_rank"), [(1, 512), (4, 128), (8, 64)])
def test_per_rank_batch_divisible(world_size: int, per_rank: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert per_rank_batch_size(512, world_size) == per_rank


def test_per_rank_batch_warns_when_world_size_changes_the_global_batch() -> None:
    with pytest.warns(UserWarning, match="effective global batch is 510, not 512"):
        assert per_rank_batch_size(512, 3) == 170
    with pytest.raises(ValueError, match="below the world size"):
        per_rank_batch_size(2, 4)


def test_setup_uses_the_trainer_world_size(caplog: pytest.LogCaptureFixture) -> None:
    dm = _toy_module(batch_size=64)
    dm.trainer = SimpleNamespace(world_size=3)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="world size 3"):
        dm.setup("fit")
    assert dm.per_rank_batch_size == 21
    assert "global batch 64, world size 3, per-rank batch 21, effective global batch 63" in caplog.text
    assert next(iter(dm.train_dataloader()))[0].shape == (21, 2)


def test_world_size_one_and_loaders() -> None:
    dm = _toy_module(batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert dm.per_rank_batch_size == 64 and x.shape == (64, 2) and y.dtype == torch.int64
    assert len(loader) == 1000 // 64  # drop_last
    assert dm.val_dataloader() == []
    assert (dm.shape, dm.num_classes) == ((2,), 0)


def test_first_batch_is_deterministic_given_the_seed() -> None:
    def first_batch(seed: int | None) -> torch.Tensor:
        dm = _toy_module(seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    torch.manual_seed(5)  # seed=None follows the process seed (seed_everything)
    assert torch.equal(first_batch(None), first_batch(5))


def test_validation_loader_keeps_order_and_remainder() -> None:
    dm = _toy_module(batch_size=64, val_dataset=partial(Toy2D, "moons", n=100, seed=1))
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [len(b[0]) for b in batches] == [64, 36]
    assert torch.equal(torch.cat([b[0] for b in batches]), dm.val_set.x)


def test_mismatched_shape_or_classes_are_named() -> None:
    dm = DiffusionDataModule(partial(Toy2D, n=100), batch_size=8, shape=[1, 8, 8], num_classes=0)
    with pytest.raises(ValueError, match=r"data.shape=\[1, 8, 8\]"):
        dm.setup("fit")


def test_bad_batch_sizes_and_order_of_calls() -> None:
    with pytest.raises(ValueError, match="positive"):
        _toy_module(batch_size=0)
    with pytest.raises(RuntimeError, match="setup"):
        _toy_module().train_dataloader()
    dm = _toy_module(batch_size=2048)
    with pytest.raises(ValueError, match="1000 items"):
        dm.setup("fit")


def test_prepare_data_builds_only_downloading_datasets() -> None:
    calls = []

    def fake(download: bool = False) -> None:
        calls.append(download)

    dm = DiffusionDataModule(partial(fake, download=True), 8, [2], 0, partial(fake, download=False))
    dm.prepare_data()
    assert calls == [True]


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_fits_with_a_lightning_trainer() -> None:
    """Without a val_dataset the empty validation loader makes Lightning skip validation_step."""

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            assert batch[0].shape == (64, 2)
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
            raise AssertionError("no validation data was configured")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=_toy_module())
    assert trainer.global_step == 3


# ---- conf/data ----------------------------------------------------------------------------------


def _compose(name: str, data_dir: Path) -> DictConfig:
    data = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": data})


def test_every_config_is_present() -> None:
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted([*CONFIGS, "reflow"])


def test_reflow_config_needs_a_parent(tmp_path: Path) -> None:
    """data=reflow builds its pairs from a parent checkpoint (tests/lightning/test_reflow.py); without
    one, setup stops with the command that makes it."""
    dm = instantiate(_compose("reflow", tmp_path).data)
    with pytest.raises(ConfigError, match=r"parent_ckpt=null.*python -m diffusionflow.train"):
        dm.setup("fit")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_instantiates(name: str, tmp_path: Path) -> None:
    cfg = _compose(name, tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, DiffusionDataModule)
    assert dm.shape == tuple(cfg.data.shape) and dm.num_classes == cfg.data.num_classes
    if name in ON_DISK:
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            dm.setup("fit")
        return
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (cfg.data.batch_size, *cfg.data.shape) and y.dtype == torch.int64
    if dm.val_set is not None:
        assert next(iter(dm.val_dataloader()))[0].shape[1:] == dm.shape


# ---- mid-epoch resume: the training loader's state ------------------------------------------------


def _train_loader(**kwargs) -> DataLoader:
    dm = _toy_module(batch_size=64, **kwargs)  # 1000 points: 15 batches per epoch
    dm.setup("fit")
    return dm.train_dataloader()


def _epoch(loader: DataLoader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [x for x, _ in loader]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_resumes_mid_epoch_in_the_uninterrupted_order(workers: int) -> None:
    """5 batches of epoch 1, then a new loader restored from the state: the other 10 batches of epoch 1
    exactly, then all of epoch 2 (also with a persistent worker, whose iterator is reused per epoch)."""
    kw = {"num_workers": workers, "persistent_workers": workers > 0}
    straight = _train_loader(**kw)
    want1, want2 = _epoch(straight, 1), _epoch(straight, 2)
    first = _train_loader(**kw)
    first.sampler.set_epoch(1)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 5, "batches_per_epoch": 15, "batch_size": 64}

    resumed = _train_loader(**kw)
    assert isinstance(resumed, ResumableDataLoader)  # Lightning saves and restores its state_dict
    resumed.load_state_dict(state)
    assert len(resumed) == 15  # Lightning's count of the epoch is unchanged
    rest = _epoch(resumed, 1)  # Lightning sets the restored epoch again before iterating
    assert len(rest) == 10 and all(torch.equal(a, b) for a, b in zip(rest, want1[5:], strict=True))
    assert resumed.state_dict()["batches_consumed"] == 15
    nxt = _epoch(resumed, 2)
    assert len(nxt) == 15 and all(torch.equal(a, b) for a, b in zip(nxt, want2, strict=True))


def test_loader_state_at_an_epoch_end_resumes_at_the_next_epoch() -> None:
    straight = _train_loader()
    want = _epoch(straight, 4)
    resumed = _train_loader()
    resumed.load_state_dict({"epoch": 3, "batches_consumed": 15, "batches_per_epoch": 15, "batch_size": 64})
    assert resumed.sampler.epoch == 4
    got = [x for x, _ in resumed]  # iterated before Lightning's set_epoch: the epoch is already right
    assert len(got) == 15 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_loader_state_from_another_batch_size_warns() -> None:
    resumed = _train_loader()
    state = {"epoch": 0, "batches_consumed": 3, "batches_per_epoch": 7, "batch_size": 128}
    with pytest.warns(
        UserWarning, match="saved with 7 batches of 128 per epoch into one with 15 batches of 64"
    ):
        resumed.load_state_dict(state)


def test_ranks_share_each_epoch_and_resume_their_own_batches() -> None:
    """On 2 ranks each loads half of every epoch's permutation (disjoint, together all of it), a new
    permutation every epoch, and restored mid-epoch each skips its own consumed batches. The sampler is
    a ``DistributedSampler``, so Lightning uses it as it is instead of wrapping it."""

    def ranked(rank: int) -> DataLoader:
        dm = _toy_module(batch_size=128)  # 64 per rank, 1000 points: 500 per rank, 7 batches
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        return dm.train_dataloader()

    loaders = [ranked(0), ranked(1)]
    assert all(isinstance(dl.sampler, DistributedSampler) and len(dl) == 7 for dl in loaders)
    for epoch in (0, 1):
        for dl in loaders:
            dl.sampler.set_epoch(epoch)
        shares = [list(dl.sampler) for dl in loaders]
        assert len(shares[0]) == len(shares[1]) == 500 and not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(1000))
    assert list(loaders[0].sampler) != _epoch_indices(ranked(0), 0)  # reshuffled per epoch
    for rank in (0, 1):
        want = _epoch(ranked(rank), 0)
        loader = ranked(rank)
        loader.load_state_dict({"epoch": 0, "batches_consumed": 3, "batches_per_epoch": 7, "batch_size": 64})
        rest = _epoch(loader, 0)
        assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(rest, want[3:], strict=True))


def _epoch_indices(loader: DataLoader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return list(loader.sampler)
