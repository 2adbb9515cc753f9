"""The one LightningDataModule: any dataset of the ``diffusionflow.data`` contract, a *global* batch.

Datasets are passed as zero-argument factories (in Hydra, ``_partial_: true`` configs), built in
``setup()`` on each process: instantiating the config stays cheap, nothing is loaded in a process that
does not train, and ``ddp_spawn`` pickles factories rather than data. ``batch_size`` is the global batch
across all ranks (EDM convention, Karras et al. 2022), so a run reproduces a paper's batch whatever the
GPU count; each rank loads ``batch_size // world_size`` and a warning says when that changes the
effective global batch (users ask for this: flow_matching#68, torchcfm#63).

The training loader is a ``ResumableDataLoader``: Lightning saves its ``state_dict`` (epoch and batches
consumed) in every checkpoint and restores it before iterating, so a run resumed mid-epoch skips exactly
the batches it had already trained on and sees the uninterrupted run's data order.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["DiffusionDataModule", "EpochShuffle", "ResumableDataLoader", "per_rank_batch_size"]

log = logging.getLogger(__name__)
DatasetFactory = Callable[[], Dataset]


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """global_batch // world_size, with a warning when the remainder changes the effective global batch."""
    per_rank = global_batch // world_size
    if per_rank == 0:
        raise ValueError(f"data.batch_size={global_batch} (global) is below the world size {world_size}")
    if per_rank * world_size != global_batch:
        rank_zero_warn(
            f"data.batch_size={global_batch} (global) is not divisible by the world size {world_size}: "
            f"each rank loads {per_rank}, so the effective global batch is {per_rank * world_size}, "
            f"not {global_batch}"
        )
    return per_rank


class EpochShuffle(DistributedSampler):
    """A random permutation per epoch, a function of (seed, epoch) only, and this rank's share of it.

    Lightning calls ``set_epoch``, so a run resumed at an epoch boundary sees exactly the batches of the
    uninterrupted run. On ``num_replicas`` ranks, rank r takes every ``num_replicas``-th index from r of
    the permutation (padded with its first indices to a multiple of ``num_replicas``), as Lightning's
    ``DistributedSampler`` wrapper did. It is a ``DistributedSampler`` so that Lightning keeps it instead
    of wrapping it: the wrapper received ``set_epoch`` and this sampler never did, so every epoch on
    several ranks repeated epoch 0's order. (``DistributedSampler.__init__`` is not called: it needs a
    data set and a process group; these are all the attributes it sets that are used.)
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.n, self.seed, self.epoch = n, seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.drop_last = True, False
        self.num_samples = -(-n // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.total_size - self.n]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class _SkipFirst:
    """The index batches of ``batches`` without the first ``skip`` while ``sampler`` is still at ``epoch``:
    only indices are drawn for the skipped ones (no data is loaded), and ``len`` stays the full epoch's,
    as Lightning counts it. Tied to the epoch because a persistent-workers iterator keeps this object
    and iterates it again for every later epoch (which must not skip)."""

    def __init__(self, batches: Iterable[Any], skip: int, sampler: Any, epoch: int) -> None:
        self.batches, self.skip, self.sampler, self.epoch = batches, skip, sampler, epoch

    def __iter__(self) -> Iterator[Any]:
        skip = self.skip if int(getattr(self.sampler, "epoch", 0)) == self.epoch else 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class _Counted:
    """An iterator over a loader's batches that counts them on the loader as they are handed out."""

    def __init__(self, loader: ResumableDataLoader, iterator: Iterator[Any]) -> None:
        self.loader, self.iterator = loader, iterator

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader.batches_consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can resume mid-epoch (its ``_Stateful`` protocol).

    ``state_dict`` holds the sampler's epoch and the batches handed out in that epoch (counted where
    training receives them, after worker prefetching, so it is the number trained on when a checkpoint is
    written at a batch end). Lightning restores it before it creates the epoch's iterator (``FitLoop.
    setup_data``); ``load_state_dict`` then sets the sampler's epoch and makes the next iteration skip
    the consumed batches at the level of the outermost index sampler (each rank skips batches of its
    own share; also under a sampler Lightning wraps). A state saved at the end of an epoch resumes at the
    start of the next one. Exact when the per-rank batch, the world size and the data set are those of
    the run that saved it (``lightning.resume`` refuses a changed data config; a changed number of
    batches per epoch or per-rank batch size is warned about here).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_consumed = 0
        self._skip = 0

    @property
    def _index_sampler(self) -> Any:
        """torch's hook for the sampler of indices a ``DataLoader`` iterates (not public API, stable
        since torch 1.7): with a pending skip, the same sampler minus the consumed batches. If torch
        stops reading it, ``tests/train/test_resume.py`` (mid-epoch weights equal) fails."""
        base = super()._index_sampler
        return _SkipFirst(base, self._skip, self.sampler, self._epoch()) if self._skip else base

    def __iter__(self) -> Iterator[Any]:
        self.batches_consumed = self._skip
        iterator = super().__iter__()  # reads _index_sampler, with the skip, once
        self._skip = 0
        return _Counted(self, iterator)

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        """The epoch and the batches of it handed out, with what they were counted in."""
        return {
            "epoch": self._epoch(),
            "batches_consumed": self.batches_consumed,
            "batches_per_epoch": len(self),
            "batch_size": int(self.batch_size or 0),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where ``state`` stopped: its epoch with its consumed batches skipped, or the next
        epoch from its start when ``state`` was saved at the end of an epoch."""
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        saved = (int(state.get("batches_per_epoch", len(self))), int(state.get("batch_size", 0)))
        if saved != (len(self), int(self.batch_size or 0)):
            rank_zero_warn(
                f"resuming a data loader saved with {saved[0]} batches of {saved[1]} per epoch into one "
                f"with {len(self)} batches of {self.batch_size} (world size or data changed): skipping "
                f"{consumed} batches of epoch {epoch}, but the data order is not the uninterrupted run's"
            )
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self._skip = consumed


class DiffusionDataModule(LightningDataModule):
    """Train (and optionally validation) loaders over datasets built from factories.

    Args:
        train_dataset: zero-argument callable returning the training dataset (e.g. a Hydra partial).
        batch_size: global batch size across all ranks.
        shape: the shape of one x, as the model configs expect it; checked against the dataset.
        num_classes: 0 for unconditional data, else the number of classes; checked against the dataset.
        val_dataset: optional factory of the validation dataset (no validation loader when None).
        seed: seeds the training shuffle and the worker RNGs (random flips), so runs are reproducible;
            None follows the process's torch seed (``torch.initial_seed()``, set by ``seed_everything``).
        vae: for latent data (``conf/data/latents.yaml``), the VAE that decodes them: ``config``,
            ``weights_path``, ``normalisation`` (:mod:`diffusionflow.nn.vae`); None for pixel data.
    """

    def __init__(
        self,
        train_dataset: DatasetFactory,
        batch_size: int,
        shape: Sequence[int],
        num_classes: int,
        val_dataset: DatasetFactory | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int | None = 0,
        vae: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive global batch size, got {batch_size}")
        self.train_factory = train_dataset
        self.val_factory = val_dataset
        self.batch_size = batch_size
        self._shape = tuple(int(s) for s in shape)
        self._num_classes = int(num_classes)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.vae = None if vae is None else dict(vae)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.per_rank_batch_size: int | None = None
        self.world_size, self.rank = 1, 0

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def prepare_data(self) -> None:
        """Once per node, before ``setup``: datasets configured with ``download=True`` fetch their files
        here, so that ranks do not download concurrently."""
        for factory in (self.train_factory, self.val_factory):
            if getattr(factory, "keywords", {}).get("download"):
                factory()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._build(self.train_factory, "train_dataset")
            self.val_set = None if self.val_factory is None else self._build(self.val_factory, "val_dataset")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        self.world_size, self.rank = world_size, int(getattr(self.trainer, "global_rank", 0) or 0)
        self.per_rank_batch_size = per_rank_batch_size(self.batch_size, world_size)
        if len(self.train_set) // world_size < self.per_rank_batch_size:
            raise ValueError(
                f"the training set has {len(self.train_set)} items: not one full batch of "
                f"{self.per_rank_batch_size} per rank on {world_size} ranks (lower data.batch_size)"
            )
        rank_zero_only(log.info)(
            f"data: global batch {self.batch_size}, world size {world_size}, per-rank batch "
            f"{self.per_rank_batch_size}, effective global batch {self.per_rank_batch_size * world_size}"
        )

    def _build(self, factory: DatasetFactory, key: str) -> Dataset:
        dataset = factory()
        found = (tuple(dataset.shape), dataset.num_classes)
        if found != (self.shape, self.num_classes):
            raise ValueError(
                f"data.{key} gives shape {found[0]} and num_classes {found[1]}, but the data config says "
                f"data.shape={list(self.shape)} and data.num_classes={self.num_classes}"
            )
        return dataset

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if self.per_rank_batch_size is None:
            raise RuntimeError("call setup() before asking DiffusionDataModule for a DataLoader")
        seed = torch.initial_seed() if self.seed is None else self.seed
        loader = ResumableDataLoader if train else DataLoader
        return loader(
            dataset,
            batch_size=self.per_rank_batch_size,
            sampler=EpochShuffle(len(dataset), seed, self.world_size, self.rank) if train else None,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, or an empty list (Lightning then skips validation) without a val_dataset."""
        return [] if self.val_set is None else self._loader(self.val_set, train=False)
