"""The one LightningDataModule: any dataset of the ``diffusionflow.data`` contract, a *global* batch.

Datasets are passed as zero-argument factories (in Hydra, ``_partial_: true`` configs), built in
``setup()`` on each process: instantiating the config stays cheap, nothing is loaded in a process that
does not train, and ``ddp_spawn`` pickles factories rather than data. ``batch_size`` is the global batch
across all ranks (EDM convention, Karras et al. 2022), so a run reproduces a paper's batch whatever the
GPU count; each rank loads ``batch_size // world_size`` and a warning says when that changes the
effective global batch (users ask for this: flow_matching#68, torchcfm#63).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["DiffusionDataModule", "EpochShuffle", "per_rank_batch_size"]

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


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch, a function of (seed, epoch) only: Lightning calls ``set_epoch``,
    so a run resumed at an epoch boundary sees exactly the batches of the uninterrupted run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


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
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.per_rank_batch_size: int | None = None

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
        return DataLoader(
            dataset,
            batch_size=self.per_rank_batch_size,
            sampler=EpochShuffle(len(dataset), seed) if train else None,
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
