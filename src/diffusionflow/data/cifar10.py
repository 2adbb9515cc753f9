"""CIFAR-10 (Krizhevsky 2009) read from the "python version" layout that torchvision also uses:
``<root>/cifar-10-batches-py/`` with pickled ``data_batch_1`` … ``data_batch_5`` (train, 50 000),
``test_batch`` (10 000) and ``batches.meta``. Each batch holds ``b"data"``, uint8 (N, 3072) with the
red, green and blue 32×32 planes one after the other (so a row reshapes to CHW), and ``b"labels"``.

The pickles are read here rather than through ``torchvision.datasets.CIFAR10``, which insists on the
md5 of every file; torchvision is used only to download when ``download=True``. They are read with a
restricted unpickler that rebuilds numpy arrays and plain containers only (dicts, lists, bytes, ints):
any other global a file names (a class, a function such as ``os.system``) is refused, naming the
file, before anything is called — a pickle is a program, and a downloaded one is not trusted.
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


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array names, under numpy 1.x's and 2.x's module paths: the
    ``_reconstruct`` of ``ndarray.__reduce__`` (protocols ≤ 4; the CIFAR-10 files), the ``_frombuffer``
    of protocol 5, ``ndarray`` and ``dtype``; and the latin-1 ``_codecs.encode`` of ``bytes`` written by
    Python 3 with protocols ≤ 2 (the original files, from Python 2, need only the numpy names)."""
    reconstruct = np.ndarray(0, np.uint8).__reduce__()[0]
    frombuffer = np.ndarray(0, np.uint8).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_bytes
    return allowed


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle ``bytes`` with protocols ≤ 2, and only that:
    ``latin1`` (other codecs, e.g. zlib, are refused)."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"it calls _codecs.encode with {encoding!r}; allowed: 'latin1' only")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers; any other global is an ``UnpicklingError``."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names the global {module}.{name}, which a CIFAR-10 batch never holds "
                "(allowed: numpy arrays, dicts, lists, bytes, str, ints)"
            ) from None


def _unpickle(path: Path) -> dict[bytes, object]:
    """The dict pickled in ``path``, read with :class:`_BatchUnpickler`; a ``ValueError`` naming the file
    if it is not a CIFAR-10 batch (another global, garbage, truncated, not a dict)."""
    try:
        with path.open("rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        reason = f"empty or truncated ({err or 'end of file'})" if isinstance(err, EOFError) else str(err)
        raise ValueError(f"{path} is not a CIFAR-10 python batch, not loaded: {reason}") from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch: it holds a {type(obj).__name__}, not a dict"
        )
    return obj


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
