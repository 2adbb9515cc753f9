"""EDM's augmentation pipeline: the resampler is exact where it must be, labels describe the
transformation that was applied, p = 0 is the identity, training sees labels and sampling does not."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.nn.functional import pad

from diffusionflow.config import ConfigError
from diffusionflow.core import predictions, proposals, samplers, schedules, weightings
from diffusionflow.data.augment import SYM6, AugmentPipe, warp
from diffusionflow.lightning.module import DiffusionModule, step_seed
from diffusionflow.nn import UNet
from diffusionflow.train import train
from train.conftest import compose_train

EDM = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # EDM's train.py


def centred(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Centred pixel coordinates (x, y), each (H, W), in float64."""
    y = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    x = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    return torch.meshgrid(x, y, indexing="xy")


def rotation(phi: float) -> Tensor:
    return torch.tensor(
        [[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64
    )


def test_sym6_is_an_orthonormal_filter_with_six_vanishing_moments():
    h = torch.tensor(SYM6, dtype=torch.float64)
    k = torch.arange(12, dtype=torch.float64)
    assert h.sum() == pytest.approx(math.sqrt(2), abs=1e-12)
    for n in range(6):  # Σ_k h_k h_{k+2n} = δ_n
        assert (h[: 12 - 2 * n] * h[2 * n :]).sum() == pytest.approx(float(n == 0), abs=1e-11)
    alternating = (-1) ** k * h  # the wavelet's moments are these, reindexed
    moments = [(alternating * k**m).sum() / (k**m).abs().sum() for m in range(7)]
    assert all(abs(v) < 1e-9 for v in moments[:6]) and abs(moments[6]) > 1e-5  # six, not seven


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 12, 7)])
def test_identity_warp_returns_the_image(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = warp(x, torch.eye(2, dtype=torch.float64).expand(shape[0], 2, 2), torch.zeros(shape[0], 2))
    assert (out - x).abs().max() < 1e-10  # orthonormal filter: down(up(x)) = x


@pytest.mark.parametrize(("tx", "ty"), [(2, -3), (-1, 5), (0, 1)])
def test_integer_translation_is_the_mirrored_shift(tx, ty):
    """Output (x, y) = input (x − tx, y − ty), the image mirrored about its border pixels (torch's
    ``reflect`` padding as the peer)."""
    x = torch.randn(3, 2, 10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = warp(x, torch.eye(2, dtype=torch.float64).expand(3, 2, 2), torch.tensor([[tx, ty]] * 3))
    m = 6
    padded = pad(x, (m, m, m, m), mode="reflect")
    expected = padded[:, :, m - ty : m - ty + 10, m - tx : m - tx + 9]
    assert (out - expected).abs().max() < 1e-10


def test_affine_maps_of_a_linear_ramp_are_exact():
    """Upsampling reproduces polynomials of degree < 6 and bilinear sampling linear ones, so away from the
    border a ramp comes out exactly as ``f(M (q − t))``: this pins the 2× grid's alignment (a filter
    centre of 5.5 instead of the centroid 5.098 gives errors of ~0.02 here)."""
    size = 48
    x, y = centred(size, size)

    def ramp(u: Tensor, v: Tensor) -> Tensor:
        return 0.3 + 0.05 * u - 0.07 * v

    image = ramp(x, y)[None, None]
    for scale, phi, t in [(1.1, 0.7, (1.3, -0.7)), (0.8, -2.9, (-0.4, 2.2)), (1.0, math.pi, (0.5, 0.25))]:
        m = rotation(phi) @ torch.diag(torch.tensor([1 / scale, scale], dtype=torch.float64))
        out = warp(image, m[None], torch.tensor([t], dtype=torch.float64))[0, 0]
        q = torch.stack([x, y], -1) - torch.tensor(t, dtype=torch.float64)
        p = q @ m.T
        inner = slice(20, 28)  # its samples stay > 4 pixels inside the image: no mirrored content
        assert (out - ramp(p[..., 0], p[..., 1]))[inner, inner].abs().max() < 1e-10


def test_p_zero_is_the_identity():
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out, labels = AugmentPipe(0.0, **EDM)(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, images) and labels.shape == (16, 9) and not labels.any()


def test_zero_labels_exactly_when_the_image_is_untouched():
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    out, labels = AugmentPipe(0.3, **EDM)(images, torch.Generator().manual_seed(5))
    untouched = (labels == 0).all(1)
    assert 0 < untouched.sum() < 64  # both kinds occur (x-flip alone leaves ~1/2 · 0.7^5 untouched)
    assert torch.equal(out[untouched], images[untouched])
    assert ((out[~untouched] - images[~untouched]).flatten(1).abs().amax(1) > 1e-3).all()


def test_flip_labels_are_the_pixel_flips():
    images = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    pipe = AugmentPipe(1.0, xflip=1, yflip=1)
    out, labels = pipe(images, torch.Generator().manual_seed(7))
    assert pipe.label_dim == 2 and set(labels.unique().tolist()) == {0.0, 1.0}
    for image, result, (b_x, b_y) in zip(images, out, labels.tolist(), strict=True):
        expected = image.flip(-1) if b_x else image
        assert torch.equal(result, expected.flip(-2) if b_y else expected)


def inverse_map_from_labels(labels: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """(flip signs (N, 2), M (N, 2, 2), t (N, 2)) from EDM's 9 labels, by the module docstring's table:
    the input is read at ``p = M (q − t)`` after the flips."""
    b_x, b_y, w_s, cos_m1, sin_t, a_c, a_s, w_x, w_y = labels.double().unbind(1)
    signs = torch.stack([1 - 2 * b_x, 1 - 2 * b_y], 1)
    s = torch.exp2(0.2 * w_s)
    theta = torch.atan2(sin_t, cos_m1 + 1)
    r = torch.atan(a_s / a_c.where(a_c != 0, 1.0))  # r in (−π/2, π/2): w_a carries the sign
    w_a = torch.sign(a_c.where(a_c != 0, a_s)) * torch.hypot(a_c, a_s)
    s_a = torch.exp2(0.2 * w_a)
    matrices = []
    for i in range(len(labels)):
        stretch = torch.diag(torch.stack([1 / s_a[i], s_a[i]]))
        iso = torch.eye(2, dtype=torch.float64) / s[i]
        matrices.append(iso @ rotation(theta[i]) @ rotation(-r[i]) @ stretch @ rotation(r[i]))
    t = 0.125 * torch.stack([width * w_x, height * w_y], 1)
    return signs, torch.stack(matrices), t


def blob(u: Tensor, v: Tensor) -> Tensor:
    """A smooth, off-centre, non-symmetric test image for 64×64 pixels."""
    return torch.exp(-((u - 4.6) ** 2 / 72 + (v + 3.4) ** 2 / 40))


def fold(u: Tensor, half: float) -> Tensor:
    """Coordinates of the image mirrored about its border pixels (|u| ≤ half, period 4·half)."""
    u = (u + half).remainder(4 * half)
    return torch.where(u <= 2 * half, u, 4 * half - u) - half


def test_labels_describe_the_transformation():
    """Every transformation on (p = 1): the output is the analytic image read where the transformation rebuilt
    from the labels alone says, within the resampling error of a smooth image (bilinear at 2×: O(h² f''),
    < 4e-3 of the peak here, 4× more at half the size); reading sin θ with the wrong sign is off by > 0.1."""
    size = 64
    x, y = centred(size, size)
    images = blob(x, y).expand(16, 1, size, size).contiguous()
    out, labels = AugmentPipe(1.0, **EDM)(images, torch.Generator().manual_seed(8))
    assert (
        labels.shape == (16, 9) and (labels[:, [2, 3, 4, 5, 7, 8]] != 0).all()
    )  # aniso: r = 0 half the time
    q = torch.stack([x, y], -1)

    def error(labels: Tensor) -> Tensor:
        signs, m, t = inverse_map_from_labels(labels, size, size)
        p = torch.einsum("nij,nhwj->nhwi", m, q[None] - t[:, None, None]) * signs[:, None, None]
        half = (size - 1) / 2
        return (out[:, 0] - blob(fold(p[..., 0], half), fold(p[..., 1], half))).flatten(1).abs().amax(1)

    assert error(labels).max() < 4e-3, error(labels)
    assert error(labels * torch.tensor([1, 1, 1, 1, -1, 1, 1, 1, 1])).median() > 0.1


def tiny_module(augment: AugmentPipe | None, augment_dim: int) -> DiffusionModule:
    torch.manual_seed(0)
    sched = schedules.build("flow")
    backbone = UNet.preset("tiny", [1, 8, 8], augment_dim=augment_dim)
    with torch.no_grad():  # zero-initialised output and residual convs: make the output depend on everything
        for p in backbone.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return DiffusionModule(
        backbone,
        sched,
        predictions.build("flow"),
        weightings.build("flow"),
        proposals.build("uniform_t", schedule=sched),
        samplers.build("euler", steps=2),
        optimizer=lambda params: torch.optim.Adam(params),
        augment=augment,
    )


@pytest.mark.usefixtures("one_thread")
def test_training_passes_the_labels_and_sampling_passes_none():
    pipe = AugmentPipe(0.5, **EDM)
    module = tiny_module(pipe, augment_dim=9)
    calls: list[dict] = []
    module.backbone.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    module._loss(x, torch.zeros(16, dtype=torch.long), stream=0)
    seed = step_seed(module.seed, 0, 0, 2)  # rank 0, step 0, the augmentation's stream
    _, expected = pipe(x, torch.Generator().manual_seed(seed))
    assert torch.equal(calls[-1]["augment_labels"], expected) and expected.any()

    z, t = torch.randn(16, 1, 8, 8), torch.tensor(0.6)
    with torch.no_grad():
        x_hat = module.denoiser()(z, t)
        assert calls[-1].get("augment_labels") is None
        o = module.schedule(t.double())
        c_noise = module.prediction.c_noise(o.logsnr).float().expand(16)
        alpha, sigma = o.alpha.float(), o.sigma.float()
        zero_labels = module.backbone(
            module.prediction.c_in(alpha, sigma) * z, c_noise, augment_labels=torch.zeros(16, 9)
        )
        some_labels = module.backbone(
            module.prediction.c_in(alpha, sigma) * z, c_noise, augment_labels=torch.ones(16, 9)
        )
    assert torch.equal(x_hat, module.prediction.to_x_eps(zero_labels, z, alpha, sigma)[0])
    assert not torch.allclose(zero_labels, some_labels)  # the labels do reach the network


@pytest.mark.usefixtures("one_thread")
def test_backbone_augment_dim_must_match_the_labels(tmp_path: Path):
    with pytest.raises(ValueError, match=r"backbone.augment_dim=0 \(UNet\) must equal .* 9"):
        tiny_module(AugmentPipe(0.12, **EDM), augment_dim=0)
    with pytest.raises(ValueError, match=r"backbone.augment_dim=9 .* 0 \(model.augment: None\)"):
        tiny_module(None, augment_dim=9)
    base = ["data=digits", "backbone=unet_tiny", "augment=edm"]
    for overrides, match in [
        (["backbone.augment_dim=3"], r"backbone.augment_dim=3 \(UNet\) must equal the number of .* 9"),
        (["model.augment.yflip=0"], r"backbone.augment_dim=9 \(UNet\) must equal the number of .* 8"),
        (["model.augment.p=1.5"], r"model.augment.p=1.5: expected a number in \[0, 1\]"),
        (["model.augment.scale_std=-1"], r"model.augment.scale_std=-1: expected a number >= 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            train(compose_train(base + overrides, tmp_path))
        assert not (tmp_path / "checkpoints").exists()


def test_pipe_options_are_checked():
    with pytest.raises(ValueError, match=r"p=1.2 is not allowed; expected a number in \[0, 1\]"):
        AugmentPipe(1.2)
    with pytest.raises(ValueError, match=r"aniso=-1 is not allowed; expected a finite number >= 0"):
        AugmentPipe(0.1, aniso=-1)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        AugmentPipe(0.1, xflip=1)(torch.zeros(3, 8, 8))


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_run_with_augmentation_trains_and_samples(tmp_path: Path):
    tiny = [
        "trainer.max_steps=3",
        "data.batch_size=16",
        "callbacks.final_eval.num_samples=16",
        "sampler.steps=2",
    ]
    cfg = compose_train(
        ["data=digits", "backbone=unet_tiny", "augment=edm", "model.augment.p=0.5", *tiny], tmp_path
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    samples = torch.from_numpy(np.load(tmp_path / "samples.npz", allow_pickle=False)["samples"])
    assert samples.shape == (16, 1, 8, 8) and torch.isfinite(samples).all()
