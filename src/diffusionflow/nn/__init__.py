"""Neural-network backbones: each maps ``(z_in, c_noise, labels=None)`` to a tensor shaped like ``z_in``."""

from .dit import DIT_PRESETS, DiT
from .embeddings import (
    ConditioningEmbedding,
    FourierEmbedding,
    LabelEmbedding,
    PositionalEmbedding,
    sincos_2d_position_embedding,
)
from .mlp import MLP
from .unet import UNET_PRESETS, UNet

__all__ = [
    "DIT_PRESETS",
    "MLP",
    "UNET_PRESETS",
    "ConditioningEmbedding",
    "DiT",
    "FourierEmbedding",
    "LabelEmbedding",
    "PositionalEmbedding",
    "UNet",
    "sincos_2d_position_embedding",
]
