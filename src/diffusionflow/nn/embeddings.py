"""Conditioning embeddings shared by every backbone.

* :class:`PositionalEmbedding` — the sinusoidal "timestep" embedding of the Transformer (Vaswani et al. 2017,
  §3.5) as used for the noise level by DDPM (Ho et al. 2020, App. B), DDPM++ and ADM.
* :class:`FourierEmbedding` — Gaussian random Fourier features (Tancik et al. 2020) of the noise level, as in
  NCSN++ (Song et al. 2021, App. H.2).
* :class:`LabelEmbedding` — a class-label table with one extra learned "null" row used when the label is
  dropped for classifier-free guidance (Ho & Salimans 2022, §3.2).
* :class:`ConditioningEmbedding` — noise features (plus, optionally, a bias-free linear map of augmentation
  labels, as EDM's DDPM++) → two-layer SiLU MLP, plus the label embedding, giving the single conditioning
  vector that ADM (Dhariwal & Nichol 2021) and DiT (Peebles & Xie 2023, §3.2) feed to every block.
* :func:`sincos_2d_position_embedding` — the fixed 2-D sin-cos patch-position embedding of MAE / DiT.

Backbones receive ``c_noise`` of shape ``(B,)`` or ``()`` with values of order one (−logSNR/8 in this
project), never integer timesteps; nothing here assumes a range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def broadcast_noise(c_noise: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Return ``c_noise`` as a ``(batch,)`` tensor; a 0-dim tensor (or float) is broadcast to the batch."""
    c_noise = torch.as_tensor(c_noise, device=device)
    if c_noise.ndim > 1 or (c_noise.ndim == 1 and c_noise.shape[0] != batch):
        raise ValueError(
            f"c_noise must have shape ({batch},) or be 0-dim to match the batch; got {tuple(c_noise.shape)}"
        )
    if not c_noise.is_floating_point():
        raise ValueError(f"c_noise must be a floating-point tensor; got dtype={c_noise.dtype}")
    return c_noise.expand(batch)


def _features_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sines of large arguments need at least float32, even when the network runs in bfloat16."""
    return torch.promote_types(dtype, torch.float32)


class PositionalEmbedding(nn.Module):
    """Sinusoidal features ``[cos(c·ω_i), sin(c·ω_i)]`` with ``ω_i = max_positions^(−i/(n/2 − e))``.

    ``endpoint=True`` (DDPM++) makes the lowest frequency exactly ``1/max_positions``; ``False`` is the
    Transformer / ADM / DiT convention.
    """

    freqs: Tensor

    def __init__(self, num_channels: int, max_positions: float = 10_000.0, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be an even number >= 2; got {num_channels}")
        half = num_channels // 2
        denominator = max(half - (1 if endpoint else 0), 1)
        exponents = torch.arange(half, dtype=torch.float64) / denominator
        freqs = max_positions**-exponents
        self.register_buffer("freqs", freqs.to(torch.get_default_dtype()), persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        """``c``: (B,) → (B, num_channels), in ``c``'s dtype promoted to at least float32."""
        dtype = _features_dtype(c.dtype)
        angles = c.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features ``[cos(2π c f_i), sin(2π c f_i)]``, ``f_i ~ N(0, scale²)`` fixed at init.

    The frequencies are drawn from a generator seeded with ``seed`` and stored as a (persistent) buffer, so
    two models built with the same arguments agree and a ``state_dict`` round-trips exactly.
    """

    freqs: Tensor

    def __init__(self, num_channels: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be an even number >= 2; got {num_channels}")
        if scale <= 0:
            raise ValueError(f"scale (fourier_scale) must be > 0; got {scale}")
        generator = torch.Generator().manual_seed(seed)
        freqs = torch.randn(num_channels // 2, generator=generator, dtype=torch.float64) * scale
        self.register_buffer("freqs", freqs.to(torch.get_default_dtype()))

    def forward(self, c: Tensor) -> Tensor:
        """``c``: (B,) → (B, num_channels), in ``c``'s dtype promoted to at least float32."""
        dtype = _features_dtype(c.dtype)
        angles = (2 * math.pi) * c.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class LabelEmbedding(nn.Module):
    """Table of ``num_classes + 1`` learned vectors, N(0, 0.02²) at init as in DiT; row ``num_classes`` is the
    null (dropped) label."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a label embedding; got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """``labels``: int64 (B,) in ``[0, num_classes]``, or None for the null label → (B, dim)."""
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(labels)


def validate_labels(labels: Tensor | None, num_classes: int, batch: int) -> None:
    """Check the contract on ``labels`` (static checks only, so ``torch.compile`` sees no data dependence)."""
    if labels is None:
        return
    if num_classes == 0:
        raise ValueError("labels were given but the model is unconditional (num_classes=0); pass labels=None")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},); got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor of class indices; got dtype={labels.dtype}")


def validate_augment_labels(augment_labels: Tensor | None, augment_dim: int, batch: int) -> None:
    """Check the contract on ``augment_labels`` (static checks only, as :func:`validate_labels`)."""
    if augment_labels is None:
        return
    if augment_dim == 0:
        raise ValueError(
            "augment_labels were given but the model has no augmentation input (augment_dim=0); "
            "pass augment_labels=None"
        )
    if augment_labels.shape != (batch, augment_dim):
        raise ValueError(
            f"augment_labels must have shape ({batch}, {augment_dim}); got {tuple(augment_labels.shape)}"
        )
    if not augment_labels.is_floating_point():
        raise ValueError(f"augment_labels must be a floating-point tensor; got dtype={augment_labels.dtype}")


class ConditioningEmbedding(nn.Module):
    """``MLP(noise_features(c_noise) + A·augment_labels) + label_embedding(labels)`` → (B, dim), without
    final activation.

    The noise MLP is Linear → SiLU → Linear (DDPM, ADM, DiT); the label vector is added after it, as the
    class embedding of ADM (Dhariwal & Nichol 2021, §3) and DiT (Peebles & Xie 2023, §3.2, "adaLN").
    With ``augment_dim > 0`` a bias-free ``augment_dim → features_dim`` linear map ``A`` of the
    augmentation labels is added to the noise features before the MLP, as in EDM's DDPM++ (Karras et al.
    2022, App. F.2). Without bias, ``augment_labels=None`` (sampling: no augmentation) and all-zero labels
    give the same embedding.
    """

    def __init__(
        self,
        noise_features: PositionalEmbedding | FourierEmbedding,
        features_dim: int,
        dim: int,
        num_classes: int,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional); got {num_classes}")
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be >= 0 (0 = no augmentation labels); got {augment_dim}")
        self.num_classes = num_classes
        self.augment_dim = augment_dim
        self.noise_features = noise_features
        self.augment = nn.Linear(augment_dim, features_dim, bias=False) if augment_dim > 0 else None
        self.mlp = nn.Sequential(nn.Linear(features_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = LabelEmbedding(num_classes, dim) if num_classes > 0 else None

    def forward(
        self,
        c_noise: Tensor | float,
        labels: Tensor | None,
        like: Tensor,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Embed for a batch shaped and typed like ``like`` (the backbone input)."""
        batch = like.shape[0]
        validate_labels(labels, self.num_classes, batch)
        validate_augment_labels(augment_labels, self.augment_dim, batch)
        c = broadcast_noise(c_noise, batch, like.device)
        features = self.noise_features(c).to(like.dtype)
        if self.augment is not None and augment_labels is not None:
            features = features + self.augment(augment_labels.to(like.dtype))
        emb = self.mlp(features)
        if self.label is not None:
            emb = emb + self.label(labels, batch, like.device)
        return emb


def sincos_2d_position_embedding(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos embedding, (height·width, dim), row-major over the patch grid (MAE; DiT §3.1).

    Half of the channels encode the row index and half the column index, each as
    ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(−k/(dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"dim (width) must be divisible by 4 for a 2-D sin-cos embedding; got {dim}")
    omega = 10_000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(torch.get_default_dtype())
