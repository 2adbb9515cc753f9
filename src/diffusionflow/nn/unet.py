"""DDPM++ / ADM U-Net (Song et al. 2021, App. H; Dhariwal & Nichol 2021, §3), written from the papers.

Layout (both papers and their EDM re-implementations, Karras et al. 2022, App. F.2): a 3×3 input conv;
per resolution level ``num_blocks`` residual blocks, with a down-sampling residual block between levels; a
middle of two residual blocks, the first followed by self-attention; a decoder mirroring the encoder with
``num_blocks + 1`` blocks per level, each concatenating one stored encoder activation to its input; and
GroupNorm → SiLU → zero-initialised 3×3 output conv. Every residual block receives the conditioning vector
(sinusoidal noise embedding, plus optionally EDM's augmentation-label map → MLP, plus label embedding), added
before the second GroupNorm (DDPM++) or as a scale/shift of it ("adaptive group normalisation", ADM §3). The
switches of :class:`UNet` select the two papers' variants; the presets in :data:`UNET_PRESETS` set every one
of them explicitly.

Parameter counts (``sum(p.numel() for p in model.parameters())``, checked by ``tests/nn/test_backbones.py``):

* ``ddpmpp_cifar`` on 3×32×32, unconditional: 55,732,739 without augmentation labels; with EDM's
  ``augment_dim=9`` (its CIFAR-10 training, ``train.py --augment=0.12``) the bias-free 9→128 augmentation
  map adds 1,152 weights: 55,733,891, EDM's network layer for layer (EDM, Table 7: 55.73M). With
  ``num_classes=10`` (and ``augment_dim=0``): 55,738,371 (our 11×512 label table sits after the noise MLP,
  ADM/DiT style, where EDM's DDPM++ puts a 10→128 linear layer before it).
* ``adm_imagenet64`` on 3×64×64 with ``num_classes=1000``: 295,900,035 — EDM (Table 7) reports 295.90M for
  ADM ImageNet-64. EDM's ADM predicts 6 channels (learned variance; 5,187 more weights in the output conv) and
  has no null-label row (768 fewer weights). Unconditional: 295,131,267.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention, silu

from .embeddings import ConditioningEmbedding, PositionalEmbedding

Resample = Literal["none", "up", "down"]

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests (≈135k parameters); attention at 8×8 occurs for 8×8, 16×16 and 32×32 inputs.
    "tiny": dict(
        model_channels=12,
        channel_mult=(1, 1, 2),
        num_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
        emb_channels_mult=4,
        num_heads=2,
        head_channels=0,
        adaptive_scale=True,
        resample_proj=False,
        attn_every_decoder_block=False,
        skip_scale=math.sqrt(0.5),
    ),
    # EDM's DDPM++ CIFAR-10 network ("config F", Karras et al. 2022, Table 7 and App. F.2).
    "ddpmpp_cifar": dict(
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.13,
        emb_channels_mult=4,
        num_heads=1,
        head_channels=0,
        adaptive_scale=False,
        resample_proj=True,
        attn_every_decoder_block=False,
        skip_scale=math.sqrt(0.5),
    ),
    # ADM ImageNet-64 (Dhariwal & Nichol 2021, Table 15 / App. C), as retrained by EDM.
    "adm_imagenet64": dict(
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        dropout=0.1,
        emb_channels_mult=4,
        num_heads=1,
        head_channels=64,
        adaptive_scale=True,
        resample_proj=False,
        attn_every_decoder_block=True,
        skip_scale=1.0,
    ),
}


def _validate(
    shape: tuple[int, ...],
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_blocks: int,
    attn_resolutions: tuple[int, ...],
    dropout: float,
    emb_channels_mult: int,
) -> list[int]:
    """Check the U-Net arguments; return the side length at each level."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive entries; got {shape}")
    if shape[1] != shape[2]:
        raise ValueError(f"shape must be square (H == W) for the U-Net; got {shape}")
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive ints; got {channel_mult}")
    for name, value in [
        ("model_channels", model_channels),
        ("num_blocks", num_blocks),
        ("emb_channels_mult", emb_channels_mult),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    factor = 2 ** (len(channel_mult) - 1)
    if shape[1] % factor:
        raise ValueError(
            f"resolution {shape[1]} (shape={shape}) must be divisible by 2**(len(channel_mult) - 1) = "
            f"{factor} for channel_mult={channel_mult}"
        )
    resolutions = [shape[1] >> level for level in range(len(channel_mult))]
    missing = sorted(set(attn_resolutions) - set(resolutions))
    if missing:
        raise ValueError(
            f"attn_resolutions={attn_resolutions} contains {missing}, which never occur; the resolutions of "
            f"this U-Net are {resolutions}"
        )
    return resolutions


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (the DDPM++/ADM convention)."""
    groups = max(min(32, channels // 4), 1)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _zero(module: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def _resampler(kind: Resample) -> nn.Module:
    """Box-filter resampling (DDPM++ ``resample_filter=[1,1]``): 2×2 average pooling / nearest up-sampling."""
    if kind == "down":
        return nn.AvgPool2d(2)
    if kind == "up":
        return nn.Upsample(scale_factor=2.0, mode="nearest")
    return nn.Identity()


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over pixels with a zero-initialised output projection (ADM §3)."""

    def __init__(self, channels: int, num_heads: int, skip_scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.skip_scale = skip_scale
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * self.skip_scale


class ResBlock(nn.Module):
    """GN → SiLU → (resample) → conv → inject embedding → GN → SiLU → dropout → zero-init conv, plus skip.

    ``adaptive_scale=True``: ``GN(h)·(1 + s) + b`` with ``(s, b)`` from the embedding (ADM's AdaGN);
    ``False``: ``GN(h + b)`` (DDPM++). ``resample_proj`` adds a 1×1 conv to the skip path of up/down blocks
    (DDPM++); the skip path always gets a 1×1 conv when the channel count changes. An optional
    :class:`SelfAttention2d` follows the block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        resample: Resample = "none",
        num_heads: int = 0,
        dropout: float,
        adaptive_scale: bool,
        resample_proj: bool,
        skip_scale: float,
    ) -> None:
        super().__init__()
        self.upsamples = resample == "up"
        self.adaptive_scale = adaptive_scale
        self.skip_scale = skip_scale
        self.resample = _resampler(resample)
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        project = in_channels != out_channels or (resample != "none" and resample_proj)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if project else nn.Identity()
        self.attn = SelfAttention2d(out_channels, num_heads, skip_scale) if num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x``: (B, C_in, H, W); ``emb``: (B, emb_channels), already passed through SiLU."""
        h = self.conv0(self.resample(silu(self.norm0(x))))
        params = self.emb_proj(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = self.norm1(h) * (1 + scale) + shift
        else:
            h = self.norm1(h + params)
        h = self.conv1(self.dropout(silu(h)))
        x = (h + self.skip(self.resample(x))) * self.skip_scale
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    """Noise- and label-conditioned U-Net; ``forward(z_in, c_noise, labels=None)`` returns ``z_in.shape``.

    Args:
        shape: data shape ``(C, H, W)`` with ``H == W`` divisible by ``2 ** (len(channel_mult) - 1)``.
        num_classes: number of classes (0 = unconditional); label ``num_classes`` is the null label.
        model_channels: base width; level ``l`` has ``model_channels * channel_mult[l]`` channels.
        channel_mult: per-level width multipliers (one level per resolution).
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions (side lengths) with self-attention; each must occur.
        dropout: dropout probability inside residual blocks.
        emb_channels_mult: conditioning vector width = ``model_channels * emb_channels_mult``.
        num_heads: attention heads (used when ``head_channels == 0``; DDPM++ uses 1).
        head_channels: if > 0, channels per head instead of a fixed head count (ADM uses 64).
        adaptive_scale: scale/shift (ADM) instead of additive (DDPM++) embedding injection.
        resample_proj: 1×1 conv on the skip path of up/down-sampling blocks (DDPM++).
        attn_every_decoder_block: attention after every decoder block at an attention resolution (ADM)
            rather than only after the last block of the level (DDPM++).
        skip_scale: factor applied after each residual sum (DDPM++: 1/√2; ADM: 1).
        augment_dim: length of the augmentation-label vector (0: none), mapped without bias into the noise
            features (EDM's DDPM++, Karras et al. 2022, App. F.2; see ``diffusionflow.data.augment``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        emb_channels_mult: int = 4,
        num_heads: int = 1,
        head_channels: int = 0,
        adaptive_scale: bool = True,
        resample_proj: bool = True,
        attn_every_decoder_block: bool = False,
        skip_scale: float = math.sqrt(0.5),
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        resolutions = _validate(
            shape, model_channels, channel_mult, num_blocks, attn_resolutions, dropout, emb_channels_mult
        )
        self.shape = shape
        self.num_classes = num_classes
        self.augment_dim = augment_dim

        def heads(channels: int) -> int:
            divisor, arg = (head_channels, "head_channels") if head_channels > 0 else (num_heads, "num_heads")
            if divisor < 1 or channels % divisor:
                raise ValueError(
                    f"{arg}={divisor} must be >= 1 and divide the channel count {channels} of every "
                    "attention layer"
                )
            return channels // head_channels if head_channels > 0 else num_heads

        emb_channels = model_channels * emb_channels_mult
        block_kwargs = dict(
            dropout=dropout, adaptive_scale=adaptive_scale, resample_proj=resample_proj, skip_scale=skip_scale
        )

        def block(cin: int, cout: int, attention: bool = False, resample: Resample = "none") -> ResBlock:
            return ResBlock(
                cin,
                cout,
                emb_channels,
                resample=resample,
                num_heads=heads(cout) if attention else 0,
                **block_kwargs,
            )

        self.embed = ConditioningEmbedding(
            PositionalEmbedding(model_channels, endpoint=True),
            model_channels,
            emb_channels,
            num_classes,
            augment_dim=augment_dim,
        )
        channels = model_channels
        self.conv_in = nn.Conv2d(shape[0], channels, 3, padding=1)
        skip_channels = [channels]
        self.encoder = nn.ModuleList()
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions, strict=True)):
            if level > 0:
                self.encoder.append(block(channels, channels, resample="down"))
                skip_channels.append(channels)
            for _ in range(num_blocks):
                self.encoder.append(block(channels, model_channels * mult, attention=res in attn_resolutions))
                channels = model_channels * mult
                skip_channels.append(channels)

        self.middle = nn.ModuleList([block(channels, channels, attention=True), block(channels, channels)])

        self.decoder = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            if level < len(channel_mult) - 1:
                self.decoder.append(block(channels, channels, resample="up"))
            for idx in range(num_blocks + 1):
                attention = resolutions[level] in attn_resolutions and (
                    attn_every_decoder_block or idx == num_blocks
                )
                cout = model_channels * channel_mult[level]
                self.decoder.append(block(channels + skip_channels.pop(), cout, attention=attention))
                channels = cout

        self.norm_out = _group_norm(channels)
        self.conv_out = _zero(nn.Conv2d(channels, shape[0], 3, padding=1))

    @classmethod
    def preset(cls, name: str, shape: Sequence[int], num_classes: int = 0, **overrides: Any) -> UNet:
        """Build one of :data:`UNET_PRESETS` (``"tiny"``, ``"ddpmpp_cifar"``, ``"adm_imagenet64"``)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"preset name={name!r} is unknown; choose from {sorted(UNET_PRESETS)}")
        return cls(shape, num_classes, **{**UNET_PRESETS[name], **overrides})

    def forward(
        self,
        z_in: Tensor,
        c_noise: Tensor,
        labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """``z_in``: (B, C, H, W); ``c_noise``: (B,) or (); ``labels``: int (B,) or None; ``augment_labels``:
        float (B, augment_dim), or None for no augmentation (sampling) → (B, C, H, W)."""
        if tuple(z_in.shape[1:]) != self.shape:
            raise ValueError(
                f"z_in must have shape (B, {', '.join(map(str, self.shape))}); got {tuple(z_in.shape)}"
            )
        emb = silu(self.embed(c_noise, labels, z_in, augment_labels))
        h = self.conv_in(z_in)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.decoder:
            if not block.upsamples:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(silu(self.norm_out(h)))
