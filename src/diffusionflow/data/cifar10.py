"""CIFAR-10 (Krizhevsky 2009) read from the "python version" layout that torchvision also uses:
``<root>/cifar-10-batches-py/`` with pickled ``data_batch_1`` … ``data_batch_5`` (train, 50 000),
``test_batch`` (10 000) and ``batches.meta``. Each batch holds ``b"data"``, uint8 (N, 3072) with the
red, green and blue 32×32 planes one after the other (so a row reshapes to CHW), and ``b"labels"``.

The pickles are read here rather than through ``torchvision.datasets.CIFAR10``, which insists on the
md5 of every file; torchvision is used only to download when ``download=True``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .transforms import TensorPairs, check_choice, default_hflip, require_files

__all__ = ["CIFAR10"]

FOLDER = "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META = "batches.meta"


def _unpickle(path: Path) -> dict[bytes, object]:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


class CIFAR10(TensorPairs):
    """CIFAR-10 images, float32 (3, 32, 32) in [-1, 1], labels 0..9 (names in ``classes``).

    Args:
        root: the folder that contains ``cifar-10-batches-py/``.
        split: ``train`` or ``test``.
        hflip: random left-right mirroring; None means on for train, off for test.
        download: fetch and unpack the archive with torchvision first (needs internet); otherwise
            missing files raise FileNotFoundError and nothing touches the network.
    """

    def __init__(
        self, root: str | Path, split: str = "train", hflip: bool | None = None, download: bool = False
    ) -> None:
        check_choice("split", split, tuple(FILES))
        root = Path(root).expanduser().resolve()
        folder = root / FOLDER
        if download:
            import torchvision.datasets

            torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
        require_files(
            folder,
            [*FILES[split], META],
            how=f"set data.download=true on a machine with internet, or copy {FOLDER}/ "
            f"(data_batch_1..5, test_batch, batches.meta; unpacked from "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) into {root}/",
        )
        batches = [_unpickle(folder / name) for name in FILES[split]]
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([b[b"labels"] for b in batches])
        self.classes = [name.decode() for name in _unpickle(folder / META)[b"label_names"]]
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        super().__init__(x, y, num_classes=10, hflip=default_hflip(hflip, split))
