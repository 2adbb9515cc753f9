"""DiffusionModule pieces: per-rank noise, EMA half-life, classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

from diffusionflow.core import predictions, proposals, samplers, schedules, weightings
from diffusionflow.lightning.ema import EMA
from diffusionflow.lightning.module import DiffusionModule, step_seed
from diffusionflow.nn import MLP


def test_step_seeds_differ_by_rank_step_and_stream():
    seeds = {step_seed(0, r, s, k) for r in range(4) for s in range(50) for k in range(2)}
    assert len(seeds) == 4 * 50 * 2
    assert step_seed(3, 1, 7, 0) == step_seed(3, 1, 7, 0)


def test_ema_half_life_in_images():
    """EDM: β = 0.5^(B/h) per update; after h images the old weights count one half."""
    ema = EMA(half_life_images=5000)
    ema.images_per_update = 100.0
    assert ema.beta(10) == pytest.approx(0.5 ** (100 / 5000))
    assert ema.beta(10) ** 50 == pytest.approx(0.5)
    ramp = EMA(half_life_images=5000, rampup_ratio=0.05)
    ramp.images_per_update = 100.0
    assert ramp.beta(20) == pytest.approx(0.5 ** (100 / (0.05 * 20 * 100)))  # ramp-up: h = 0.05 · images
    assert ramp.beta(10**6) == pytest.approx(ema.beta(10))
    with pytest.raises(ValueError, match="exactly one of half_life_images"):
        EMA(half_life_images=10, decay=0.9)


def _module(num_classes: int) -> DiffusionModule:
    torch.manual_seed(0)
    w = weightings.build("flow")
    sched = schedules.build("flow")
    backbone = MLP([2], num_classes=num_classes, width=32, depth=2)
    for p in backbone.parameters():  # leave the zero-initialised output: perturb everything
        torch.nn.init.normal_(p, std=0.3)
    return DiffusionModule(
        backbone,
        sched,
        predictions.build("flow"),
        w,
        proposals.build("uniform_t", schedule=sched),
        samplers.build("heun", steps=4),
        optimizer=lambda params: torch.optim.Adam(params),
        num_classes=num_classes,
    )


def test_guidance_extrapolates_from_the_unconditional_prediction():
    m = _module(num_classes=3)
    z, t = torch.randn(5, 2), torch.tensor(0.5)
    labels = torch.tensor([0, 1, 2, 0, 1])
    cond = m.denoiser(labels, guidance=1.0)(z, t)
    uncond = m.denoiser(torch.full_like(labels, 3), guidance=1.0)(z, t)
    guided = m.denoiser(labels, guidance=2.5)(z, t)
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-6)
    assert not torch.allclose(cond, uncond)
    noise = torch.randn(5, 2)
    assert not torch.allclose(
        m.generate(noise, labels, guidance=1.0), m.generate(noise, labels, guidance=3.0)
    )


def test_labels_for_an_unconditional_model_are_refused():
    with pytest.raises(ValueError, match="unconditional"):
        _module(num_classes=0).generate(torch.randn(2, 2), torch.tensor([0, 1]))
