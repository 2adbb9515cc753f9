"""Datasets: each returns ``(x, y)`` with x float32 (images in [-1, 1], CHW; toy points (2,)) and
y an int64 class index (0 for unlabeled data), and exposes ``shape`` and ``num_classes``
(0 = unconditional). Nothing touches the network unless ``download=True`` is given."""

from .cifar10 import CIFAR10
from .digits import Digits
from .imagenet import ImageNetFolder, ImageNetNpz, imagenet_dataset
from .reflow_pairs import ReflowPairs
from .toy2d import Toy2D, mixture

__all__ = [
    "CIFAR10",
    "Digits",
    "ImageNetFolder",
    "ImageNetNpz",
    "ReflowPairs",
    "Toy2D",
    "imagenet_dataset",
    "mixture",
]
