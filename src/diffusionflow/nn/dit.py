"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), written from the paper.

Patchify (§3.1: a ``p×p``-stride convolution to ``width`` channels, plus the fixed 2-D sin-cos position
embedding); ``depth`` Transformer blocks whose LayerNorms are modulated by the conditioning vector
``c = MLP(sinusoidal(c_noise)) + label_embedding`` and whose residual branches are gated by it, with the
modulation layer zero-initialised so every block starts as the identity (§3.2, "adaLN-Zero"); a final adaLN
LayerNorm and zero-initialised linear layer to ``p·p·C`` values per token; unpatchify.

Parameter counts (``sum(p.numel() for p in model.parameters())``, 3×32×32 input, unconditional; checked by
``tests/nn/test_backbones.py``):

* ``dit_s2``: 32,471,436 (the paper's DiT-S/2: 33M).
* ``dit_b2``: 129,528,588 (the paper's DiT-B/2: 130M).

The paper's models see 4×32×32 latents, predict 8 channels (learned variance), have 1000 classes and keep the
position embedding as a frozen parameter; with those settings this implementation has 32,963,360 (S/2) and
130,512,416 (B/2) parameters.

On the latents of ImageNet-256 (4×32×32, 1000 classes; checked by ``tests/nn/test_dit_presets.py``), as
trained here, predicting the 4 output channels only (no learned variance) with the position embedding a
buffer:

* ``dit_b2``: 130,303,504 (the paper's DiT-B/2: 130M).
* ``dit_xl2``: 674,816,272 (the paper's DiT-XL/2: 675M).

With the paper's 8 output channels and frozen position-embedding parameter these are 130,512,416 and
675,129,632: the learned-variance head adds ``width·p²·4 + p²·4`` (12,304 and 18,448) and the frozen table
``256·width`` (196,608 and 294,912): 0.16% of B/2, 0.05% of XL/2. SiT-XL/2 (Ma et al. 2024, "SiT: Exploring
Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers", §3) is this same
network, trained with another objective: ``backbone=dit_xl2`` with ``experiment=imagenet256_sit_flow``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention, silu

from .embeddings import ConditioningEmbedding, PositionalEmbedding, sincos_2d_position_embedding

DIT_PRESETS: dict[str, dict[str, Any]] = {
    "dit_tiny": dict(patch_size=2, depth=2, width=64, num_heads=4, mlp_ratio=4.0),
    "dit_s2": dict(patch_size=2, depth=12, width=384, num_heads=6, mlp_ratio=4.0),
    "dit_b2": dict(patch_size=2, depth=12, width=768, num_heads=12, mlp_ratio=4.0),
    "dit_xl2": dict(patch_size=2, depth=28, width=1152, num_heads=16, mlp_ratio=4.0),
}

NOISE_FEATURES = 256  # frequency-embedding size of DiT's timestep embedder


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-LN Transformer block; LN shift/scale and branch gates regressed from ``c`` (adaLN-Zero, §3.2)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.modulation = nn.Linear(width, 6 * width)

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d/heads)
        return self.attn_out(scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x``: (B, N, width) tokens; ``c``: (B, width) conditioning, already passed through SiLU."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN LayerNorm then a linear map to ``p·p·C`` values per token (both zero-initialised)."""

    def __init__(self, width: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_features)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer; ``forward(z_in, c_noise, labels=None)`` returns ``z_in.shape``.

    Args:
        shape: data shape ``(C, H, W)`` with ``H`` and ``W`` divisible by ``patch_size``.
        num_classes: number of classes (0 = unconditional); label ``num_classes`` is the null label.
        patch_size: side of the square patches (one token each).
        depth: number of Transformer blocks.
        width: token width (divisible by ``num_heads`` and by 4 for the 2-D sin-cos embedding).
        num_heads: attention heads.
        mlp_ratio: hidden width of the block MLPs relative to ``width``.
    """

    pos_embed: Tensor

    def __init__(
        self,
        shape: Sequence[int],
        num_classes: int = 0,
        patch_size: int = 2,
        depth: int = 12,
        width: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        _validate(shape, patch_size, depth, width, num_heads, mlp_ratio)
        self.shape = shape
        self.num_classes = num_classes
        self.patch_size = patch_size
        channels, height, width_px = shape
        self.grid = (height // patch_size, width_px // patch_size)
        self.patchify = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        pos = sincos_2d_position_embedding(width, *self.grid)
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.embed = ConditioningEmbedding(
            PositionalEmbedding(NOISE_FEATURES), NOISE_FEATURES, width, num_classes
        )
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, patch_size * patch_size * channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation (§3.2 and its reference code): Xavier linear layers, zero biases, N(0, 0.02)
        embedding MLP, and zeros for every adaLN modulation layer and the output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.patchify.out_channels, -1))
        nn.init.zeros_(self.patchify.bias)
        for layer in (self.embed.mlp[0], self.embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [*(block.modulation for block in self.blocks), self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def preset(cls, name: str, shape: Sequence[int], num_classes: int = 0, **overrides: Any) -> DiT:
        """Build one of :data:`DIT_PRESETS` (``"dit_tiny"``, ``"dit_s2"``, ``"dit_b2"``, ``"dit_xl2"``)."""
        if name not in DIT_PRESETS:
            raise ValueError(f"preset name={name!r} is unknown; choose from {sorted(DIT_PRESETS)}")
        return cls(shape, num_classes, **{**DIT_PRESETS[name], **overrides})

    def forward(self, z_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """``z_in``: (B, C, H, W); ``c_noise``: (B,) or (); ``labels``: int (B,) or None → (B, C, H, W)."""
        if tuple(z_in.shape[1:]) != self.shape:
            raise ValueError(
                f"z_in must have shape (B, {', '.join(map(str, self.shape))}); got {tuple(z_in.shape)}"
            )
        c = silu(self.embed(c_noise, labels, z_in))
        x = self.patchify(z_in).flatten(2).transpose(1, 2) + self.pos_embed.to(z_in.dtype)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final(x, c))

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, h·w, p·p·C) → (B, C, h·p, w·p)."""
        (h, w), p, c = self.grid, self.patch_size, self.shape[0]
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)


def _validate(
    shape: tuple[int, ...], patch_size: int, depth: int, width: int, num_heads: int, mlp_ratio: float
) -> None:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive entries; got {shape}")
    for name, value in [
        ("patch_size", patch_size),
        ("depth", depth),
        ("width", width),
        ("num_heads", num_heads),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if shape[1] % patch_size or shape[2] % patch_size:
        raise ValueError(
            f"resolution {shape[1]}×{shape[2]} (shape={shape}) must be divisible by patch_size={patch_size}"
        )
    if width % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide width={width}")
    if width % 4:
        raise ValueError(f"width={width} must be divisible by 4 for the 2-D sin-cos position embedding")
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0; got {mlp_ratio}")
