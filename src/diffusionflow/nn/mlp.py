"""Residual SiLU MLP for low-dimensional (toy) data.

The noise level enters through Gaussian Fourier features (Tancik et al. 2020; as in NCSN++, Song et al. 2021,
App. H.2) followed by a two-layer MLP; the label embedding is added to the result. Each residual block is a
pre-norm two-layer SiLU MLP whose hidden activation receives a per-block projection of the conditioning
vector (the fully connected analogue of the DDPM++ residual block). The output layer is zero-initialised, so
the untrained network outputs zero (as in EDM/ADM/DiT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.functional import silu

from .embeddings import ConditioningEmbedding, FourierEmbedding


class MLPBlock(nn.Module):
    """``x + W1·dropout(SiLU(W0·SiLU(LN(x)) + P·emb))``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc0 = nn.Linear(width, width)
        self.emb_proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(width, width)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x``: (B, width); ``emb``: (B, width), already passed through SiLU."""
        h = self.fc0(silu(self.norm(x))) + self.emb_proj(emb)
        return x + self.fc1(self.dropout(silu(h)))


class MLP(nn.Module):
    """Conditioned residual MLP; ``forward(z_in, c_noise, labels=None)`` returns ``z_in.shape``.

    Args:
        shape: data shape without batch (e.g. ``[2]``); inputs are flattened to ``prod(shape)`` features.
        num_classes: number of classes (0 = unconditional); label ``num_classes`` is the null label.
        width: hidden width.
        depth: number of residual blocks.
        emb_dim: number of Fourier features of the noise level (even).
        fourier_scale: standard deviation of the Fourier frequencies.
        dropout: dropout probability inside the residual blocks.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_classes: int = 0,
        width: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        fourier_scale: float = 16.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty sequence of positive ints; got {shape}")
        for name, value in [("width", width), ("depth", depth)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"emb_dim must be an even number >= 2; got {emb_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.shape = shape
        self.num_classes = num_classes
        features = math.prod(shape)
        self.embed = ConditioningEmbedding(
            FourierEmbedding(emb_dim, fourier_scale), emb_dim, width, num_classes
        )
        self.proj_in = nn.Linear(features, width)
        self.blocks = nn.ModuleList(MLPBlock(width, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, features)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, z_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """``z_in``: (B, *shape); ``c_noise``: (B,) or (); ``labels``: int (B,) or None → (B, *shape)."""
        if tuple(z_in.shape[1:]) != self.shape:
            raise ValueError(
                f"z_in must have shape (B, {', '.join(map(str, self.shape))}); got {tuple(z_in.shape)}"
            )
        emb = silu(self.embed(c_noise, labels, z_in))
        h = self.proj_in(z_in.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(silu(self.norm_out(h))).reshape(z_in.shape)
