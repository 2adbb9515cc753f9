"""DINOv2 vision transformers (Oquab et al. 2023), the feature network of FD-DINOv2 (Stein et al. 2023).

Written from the architecture, with the parameter names and shapes of Meta's released checkpoints
(``dinov2_vitl14_pretrain.pth`` loads with ``strict=True``): torch-fidelity builds the network with
``torch.hub.load("facebookresearch/dinov2", …)``, which fetches the repository's code from GitHub, so a
machine without internet needs the network defined here. A pre-norm ViT (Dosovitskiy et al. 2021) with
LayerScale (Touvron et al. 2021), on 14 × 14 patches:

    z₀ = [c; P x₁, …, P x_g²] + E,
    z ← z + γ₁ ⊙ Attn(LN₁ z),   z ← z + γ₂ ⊙ MLP(LN₂ z)      (× depth),
    feature = LN(z)₀                                          (the class token),

with LayerNorm ε = 1e-6, exact GELU and softmax(q kᵀ/√d_head) v attention. E holds the class token's
embedding and a 37 × 37 grid learned at 518 px; at another input size the grid is resampled bicubically
(no antialiasing) to g × g with the scale factor (g + 0.1)/37, as the released models do (the 0.1 was
added in DINO against a rounding error and kept for compatibility; it shifts the sampling positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import interpolate, scaled_dot_product_attention

__all__ = ["ARCHS", "DinoViT", "LayerScale"]

ARCHS = {"dinov2_vits14": (384, 12, 6), "dinov2_vitb14": (768, 12, 12), "dinov2_vitl14": (1024, 24, 16)}
"""Hub name → (width, depth, heads); all use 14-px patches, MLP ratio 4 and a 518-px position grid.
(ViT-g/14 uses a SwiGLU MLP and is not provided.)"""

PATCH, GRID, OFFSET = 14, 37, 0.1


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: Tensor) -> Tensor:
        b, n, d = z.shape
        q, k, v = self.qkv(z).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(z)))


class LayerScale(nn.Module):
    """γ ⊙ x, a learned per-channel gain on a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim), LayerScale(dim)

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.ls1(self.attn(self.norm1(z)))
        return z + self.ls2(self.mlp(self.norm2(z)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """A DINOv2 backbone (``arch`` from :data:`ARCHS`): normalised images (N, 3, H, W), H and W multiples
    of 14, → the class token after the final LayerNorm, (N, width). ``mask_token`` (used in training
    only) is kept so that the released state dicts load strictly."""

    def __init__(self, arch: str = "dinov2_vitl14") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"DINOv2 arch {arch!r}: allowed {list(ARCHS)}")
        dim, depth, heads = ARCHS[arch]
        self.arch, self.dim = arch, dim
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """E for an h × w patch grid: the 37 × 37 grid resampled with scale ((h, w) + 0.1)/37."""
        if (h, w) == (GRID, GRID):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, GRID, GRID, self.dim).permute(0, 3, 1, 2)
        scale = ((h + OFFSET) / GRID, (w + OFFSET) / GRID)
        grid = interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        patches = self.patch_embed(x)
        z = torch.cat([self.cls_token.expand(len(x), -1, -1), patches], dim=1)
        z = z + self.position_embedding(h, w)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)[:, 0]
