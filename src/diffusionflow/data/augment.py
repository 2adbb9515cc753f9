"""EDM's augmentation pipeline (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", App. F.2), on the non-leaking augmentations of ADA (Karras et al. 2020, "Training
Generative Adversarial Networks with Limited Data", §2.2-2.3 and App. B). Written from the papers.

Each image is transformed by a fixed sequence of transformations, each applied with its own coin of
probability ``min(1, p·m_k)`` (ADA: one probability ``p``, scaled per transformation by a multiplier
``m_k``). The network is told what was done: a vector of augmentation labels, all zero exactly when
nothing was done, is an extra conditioning input of the denoiser; sampling passes none (= zero), so the
model generates un-augmented images and the augmentation does not leak into the samples (EDM, App. F.2).

EDM's training (``train.py --augment=0.12``, its default, used for CIFAR-10) enables, in this order:

=======================  ===========================================  =======================
transformation           parameters (when its coin comes up)           labels
=======================  ===========================================  =======================
x-flip (pixel blit)      ``b_x ∈ {0, 1}``, a fair coin                  ``b_x``
y-flip (pixel blit)      ``b_y ∈ {0, 1}``, a fair coin                  ``b_y``
isotropic scaling        ``s = 2^(0.2 w_s)``, ``w_s ~ N(0, 1)``          ``w_s``
rotation                 ``θ ~ U(−π, π)``                                ``cos θ − 1``, ``sin θ``
anisotropic scaling      ``s_a = 2^(0.2 w_a)``, ``w_a ~ N(0, 1)``,       ``w_a cos r``, ``w_a sin r``
                         along the axis at angle ``r`` (``r = 0``
                         with probability ½, else ``r ~ U(−π/2, π/2)``)
fractional translation   ``t = 0.125 (W w_x, H w_y)``, ``w ~ N(0, I)``   ``w_x``, ``w_y``
=======================  ===========================================  =======================

Nine labels; a transformation whose coin does not come up has its identity parameters (0). EDM's x-flip
multiplier is 1e8, so every image's flip coin is tossed (and the dataset's own x-flips are off).

Geometry. Centred pixel coordinates: pixel (row i, column j) of an H×W image sits at
``x = j − (W−1)/2``, ``y = i − (H−1)/2`` (y points down). The output at ``q`` is the input at
``p = M (q − t)`` with ``M = S(1/s) · R(θ) · R(−r) S(1/s_a, s_a) R(r)``, ``R(φ) = [[cos φ, −sin φ],
[sin φ, cos φ]]``, ``S(a, b) = diag(a, b)``: the inverse of "scale by s, rotate by −θ, stretch by s_a
along R(−r)·(1, 0), translate by t". Resampling follows ADA (App. B): the image is mirrored outward
about its border pixels as far as the samples reach, upsampled 2× with the 12-tap Symlet-6 low-pass
filter ``h``, sampled bilinearly at 2×, and downsampled 2× with ``h``. With ``h`` orthonormal
(``Σ_k h_k h_{k+2n} = δ_n``), downsampling undoes upsampling exactly, so an identity transformation
returns the image up to rounding. The 2× sample ``f`` sits at ``(f − d)/2`` in input pixels, ``d`` the
centroid of ``h``: upsampling then reproduces polynomials of degree < 6 exactly (the wavelet's six
vanishing moments make the even and odd taps' first six moments equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.functional import conv2d, conv_transpose2d, grid_sample

__all__ = ["SYM6", "AugmentPipe", "warp"]

SYM6: tuple[float, ...] = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)
"""The Symlet-6 scaling (low-pass) filter (Daubechies 1992, "Ten Lectures on Wavelets", §8.1; the values
tabulated by PyWavelets as ``sym6``): sum √2, orthonormal to its even shifts, six vanishing moments."""


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices into ``[0, size)`` of the image mirrored about its first and last pixel (period 2(size−1))."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index < size, index, period - index)


def _up(x: Tensor, h: Tensor) -> Tensor:
    """``y[f] = Σ_n x[n] h[f − 2n]`` along both axes of (N, C, H, W) → (N, C, 2H + L − 2, 2W + L − 2)."""
    n, c, height, width = x.shape
    y = x.reshape(n * c, 1, height, width)
    y = conv_transpose2d(y, h.view(1, 1, 1, -1), stride=(1, 2))
    y = conv_transpose2d(y, h.view(1, 1, -1, 1), stride=(2, 1))
    return y.reshape(n, c, *y.shape[2:])


def _down(y: Tensor, h: Tensor) -> Tensor:
    """``x[n] = Σ_f y[f] h[f − 2n]`` along both axes, the adjoint of :func:`_up` and its inverse."""
    n, c, height, width = y.shape
    x = y.reshape(n * c, 1, height, width)
    x = conv2d(x, h.view(1, 1, 1, -1), stride=(1, 2))
    x = conv2d(x, h.view(1, 1, -1, 1), stride=(2, 1))
    return x.reshape(n, c, *x.shape[2:])


def warp(images: Tensor, matrix: Tensor, translation: Tensor, h: Tensor | None = None) -> Tensor:
    """Output pixel ``q`` = input at ``p = matrix (q − translation)`` (centred pixel coordinates, module
    docstring), resampled as ADA: mirror padding, 2× upsampling with ``h`` (default :data:`SYM6`), bilinear
    sampling at 2×, 2× downsampling with ``h``.

    ``images``: (N, C, H, W) floating point; ``matrix``: (N, 2, 2); ``translation``: (N, 2) in pixels.
    """
    height, width = images.shape[2:]
    h = torch.tensor(SYM6, dtype=torch.float64) if h is None else h
    taps = h.numel()
    h_host = h.detach().cpu().double()  # the filter's own values, not the batch's: no device sync on a GPU
    d = float((torch.arange(taps, dtype=torch.float64) * h_host).sum() / h_host.sum())  # centroid of h
    h = h.to(images.device, images.dtype)
    # Output 2× grid: sample f of each axis at (f − d)/2 output pixels, f < 2·size + taps − 2.
    fy = (torch.arange(2 * height + taps - 2, device=images.device, dtype=images.dtype) - d) / 2
    fx = (torch.arange(2 * width + taps - 2, device=images.device, dtype=images.dtype) - d) / 2
    q = torch.stack(torch.meshgrid(fx - (width - 1) / 2, fy - (height - 1) / 2, indexing="xy"), dim=-1)
    m, t = matrix.to(images), translation.to(images)
    p = torch.einsum("nij,nhwj->nhwi", m, q[None] - t[:, None, None, :])  # (N, 2H', 2W', 2): (x, y)
    # Input pixel coordinates reached; the 2× samples used there need the input within `reach` pixels:
    # bilinear taps f ± 1 around 2k + d read input pixels in [k − (L − d)/2, k + (d + 1)/2].
    reach = math.ceil(max(taps - d, d + 1) / 2)
    x_lo, x_hi = (p[..., 0].amin().item() + (width - 1) / 2, p[..., 0].amax().item() + (width - 1) / 2)
    y_lo, y_hi = (p[..., 1].amin().item() + (height - 1) / 2, p[..., 1].amax().item() + (height - 1) / 2)
    left, right = max(0, math.ceil(reach - x_lo)), max(0, math.ceil(x_hi + reach - (width - 1)))
    top, bottom = max(0, math.ceil(reach - y_lo)), max(0, math.ceil(y_hi + reach - (height - 1)))
    rows = _reflect(torch.arange(-top, height + bottom, device=images.device), height)
    cols = _reflect(torch.arange(-left, width + right, device=images.device), width)
    up = _up(images[:, :, rows[:, None], cols[None, :]], h)
    # Padded input pixel k sits at 2× sample 2k + d; grid_sample (align_corners=False) reads sample f at
    # the normalised coordinate (2f + 1)/size − 1.
    fx_in = 2 * (p[..., 0] + (width - 1) / 2 + left) + d
    fy_in = 2 * (p[..., 1] + (height - 1) / 2 + top) + d
    grid = torch.stack([(2 * fx_in + 1) / up.shape[3] - 1, (2 * fy_in + 1) / up.shape[2] - 1], dim=-1)
    sampled = grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _down(sampled, h)


def _rotation(phi: Tensor) -> Tensor:
    """``R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]]`` for a batch of angles (N,) → (N, 2, 2)."""
    c, s = phi.cos(), phi.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _scaling(a: Tensor, b: Tensor) -> Tensor:
    """``S(a, b) = diag(a, b)`` for a batch (N,) → (N, 2, 2)."""
    return torch.diag_embed(torch.stack([a, b], -1))


@dataclass(frozen=True)
class _Draw:
    """One batch's parameters: the flips, the inverse map ``p = matrix (q − translation)``, the samples it
    moves, and the labels."""

    xflip: Tensor
    yflip: Tensor
    matrix: Tensor
    translation: Tensor
    moved: Tensor
    labels: Tensor


class AugmentPipe(nn.Module):
    """EDM's geometric augmentation: ``pipe(images, generator) -> (augmented images, labels)``.

    Args:
        p: probability of each transformation, scaled by its multiplier (EDM CIFAR-10: 0.12).
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: probability multipliers ``m_k`` (0: off,
            and no labels), named as the options of EDM's pipeline (EDM: 1e8, 1, 1, 1, 1, 1).
        scale_std: standard deviation of log2 of the isotropic scale (0.2).
        rotate_frac_max: rotation range as a fraction of a half-turn each way (1: the full circle).
        aniso_std: standard deviation of log2 of the anisotropic stretch (0.2).
        aniso_rotate_prob: probability that the stretch axis is turned by a random angle (0.5).
        translate_frac_std: standard deviation of the translation, in image sizes (0.125).

    Random parameters are drawn per sample from ``generator`` (on its device) or, when it is None, from
    torch's global CPU generator, then moved to the images' device. Images are processed in at least
    float32 with autocast off and returned in their dtype; labels are float32 (N, :attr:`label_dim`).
    """

    LABELS: ClassVar[dict[str, int]] = dict(
        xflip=1, yflip=1, scale=1, rotate_frac=2, aniso=2, translate_frac=2
    )
    """Labels per transformation, in the order the transformations are applied and the labels concatenated."""

    filter: Tensor

    def __init__(
        self,
        p: float,
        xflip: float = 0.0,
        yflip: float = 0.0,
        scale: float = 0.0,
        rotate_frac: float = 0.0,
        aniso: float = 0.0,
        translate_frac: float = 0.0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1.0,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ) -> None:
        super().__init__()
        self.multipliers = dict(
            xflip=xflip,
            yflip=yflip,
            scale=scale,
            rotate_frac=rotate_frac,
            aniso=aniso,
            translate_frac=translate_frac,
        )
        stds = dict(scale_std=scale_std, aniso_std=aniso_std, translate_frac_std=translate_frac_std)
        for name, value in dict(
            p=p, rotate_frac_max=rotate_frac_max, aniso_rotate_prob=aniso_rotate_prob
        ).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment option {name}={value} is not allowed; expected a number in [0, 1]")
        for name, value in {**self.multipliers, **stds}.items():
            if not 0.0 <= value < math.inf:
                raise ValueError(
                    f"augment option {name}={value} is not allowed; expected a finite number >= 0"
                )
        self.p = p
        self.scale_std, self.rotate_frac_max, self.aniso_std = scale_std, rotate_frac_max, aniso_std
        self.aniso_rotate_prob, self.translate_frac_std = aniso_rotate_prob, translate_frac_std
        self.register_buffer("filter", torch.tensor(SYM6, dtype=torch.float64), persistent=False)

    @property
    def label_dim(self) -> int:
        """Length of the label vector: the labels of the enabled transformations (EDM: 9)."""
        return sum(n for k, n in self.LABELS.items() if self.multipliers[k] > 0)

    def extra_repr(self) -> str:
        enabled = ", ".join(f"{k}={m:g}" for k, m in self.multipliers.items() if m > 0)
        return f"p={self.p:g}, {enabled or 'nothing enabled'}, label_dim={self.label_dim}"

    def _draw(self, n: int, height: int, width: int, generator: torch.Generator | None) -> _Draw:
        """The parameters of the module docstring's table, per sample, for an N×C×H×W batch."""
        device = generator.device if generator is not None else torch.device("cpu")
        kw = dict(generator=generator, device=device, dtype=torch.float64)
        on = {k: m > 0 for k, m in self.multipliers.items()}
        zero = torch.zeros(n, device=device, dtype=torch.float64)

        def coin(name: str) -> Tensor:
            return torch.rand(n, **kw) < min(1.0, self.p * self.multipliers[name])

        b_x = ((torch.rand(n, **kw) < 0.5) & coin("xflip")).double() if on["xflip"] else zero
        b_y = ((torch.rand(n, **kw) < 0.5) & coin("yflip")).double() if on["yflip"] else zero
        w_s = torch.randn(n, **kw) * coin("scale") if on["scale"] else zero
        theta, w_a, r = zero, zero, zero
        if on["rotate_frac"]:
            theta = (2 * torch.rand(n, **kw) - 1) * math.pi * self.rotate_frac_max * coin("rotate_frac")
        if on["aniso"]:
            w_a = torch.randn(n, **kw) * coin("aniso")
            r = (torch.rand(n, **kw) - 0.5) * math.pi * (torch.rand(n, **kw) < self.aniso_rotate_prob)
        w_t = torch.zeros(n, 2, device=device, dtype=torch.float64)
        if on["translate_frac"]:
            w_t = torch.randn(n, 2, **kw) * coin("translate_frac")[:, None]
        per_transformation = dict(
            xflip=[b_x],
            yflip=[b_y],
            scale=[w_s],
            rotate_frac=[theta.cos() - 1, theta.sin()],
            aniso=[w_a * r.cos(), w_a * r.sin()],
            translate_frac=[w_t[:, 0], w_t[:, 1]],
        )
        labels = [v for k, values in per_transformation.items() if on[k] for v in values]
        s, s_a = torch.exp2(self.scale_std * w_s), torch.exp2(self.aniso_std * w_a)
        matrix = (
            _scaling(1 / s, 1 / s) @ _rotation(theta) @ _rotation(-r) @ _scaling(1 / s_a, s_a) @ _rotation(r)
        )
        translation = self.translate_frac_std * w_t * torch.tensor([width, height], device=device).double()
        moved = (w_s != 0) | (theta != 0) | (w_a != 0) | (w_t != 0).any(1)
        return _Draw(
            xflip=b_x.bool(),
            yflip=b_y.bool(),
            matrix=matrix,
            translation=translation,
            moved=moved,
            labels=torch.stack(labels, 1).float() if labels else torch.zeros(n, 0, device=device),
        )

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``images``: (N, C, H, W) → (augmented images, labels (N, label_dim)): flips, then one resampling
        with the composed map for the samples any geometric transformation moves."""
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W); got {tuple(images.shape)}")
        n, _, height, width = images.shape
        draw = self._draw(n, height, width, generator)
        out = images.to(torch.promote_types(images.dtype, torch.float32))
        with torch.autocast(images.device.type, enabled=False):
            xflip, yflip = (b.to(images.device)[:, None, None, None] for b in (draw.xflip, draw.yflip))
            out = torch.where(xflip, out.flip(3), out)
            out = torch.where(yflip, out.flip(2), out)
            moved = draw.moved.nonzero().squeeze(1)
            if len(moved):
                index = moved.to(images.device)
                warped = warp(out[index], draw.matrix[moved], draw.translation[moved], self.filter)
                out = out.index_copy(0, index, warped)
        return out.to(images.dtype), draw.labels.to(images.device)
