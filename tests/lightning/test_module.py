"""DiffusionModule pieces: per-rank noise, EMA half-life, classifier-free guidance."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch import Callback
from lightning.pytorch.utilities import grad_norm
from omegaconf import open_dict

from diffusionflow.core import predictions, proposals, samplers, schedules, weightings
from diffusionflow.lightning.ema import EMA
from diffusionflow.lightning.module import DiffusionModule, step_seed
from diffusionflow.nn import MLP
from diffusionflow.train import train
from train.conftest import compose_train


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


def test_loss_bins_and_gradient_norm_log_the_same_numbers_as_before(tmp_path, monkeypatch):
    """A fixed run: each epoch's train_bins/* are the per-bin means of the steps' ε-MSE and loss binned by
    λ as before (numpy here, on the host), and train/grad_norm and train/lr appear on the logging steps
    only, with the value of Lightning's ``grad_norm`` (the previous formula) at that step."""
    seen: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    accumulate = DiffusionModule._accumulate_bins

    def recording(self, logsnr, eps_mse, loss) -> None:
        seen.append(
            (self.current_epoch, *(v.detach().double().numpy().copy() for v in (logsnr, eps_mse, loss)))
        )
        accumulate(self, logsnr, eps_mse, loss)

    monkeypatch.setattr(DiffusionModule, "_accumulate_bins", recording)
    norms.clear()
    cfg = compose_train(
        [
            "trainer.max_steps=9",
            "trainer.log_every_n_steps=4",
            "data.train_dataset.n=160",
            "data.batch_size=32",
        ],
        tmp_path,
    )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.callbacks.grad_norms = {"_target_": f"{__name__}.GradNorms"}
    train(cfg)
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    edges = np.linspace(-12.0, 12.0, 13)
    epochs = sorted({epoch for epoch, *_ in seen})
    assert epochs == [0, 1]  # 5 steps an epoch: two epochs' bins
    for epoch in epochs:
        lam, eps_mse, loss = (np.concatenate([s[i] for s in seen if s[0] == epoch]) for i in (1, 2, 3))
        index = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, len(edges) - 2)
        row = next(r for r in rows if r["epoch"] == str(epoch) and r.get("train_bins/loss_-2_+0"))
        compared = 0
        for j in np.unique(index):
            lo, hi = edges[j], edges[j + 1]
            for key, values in (("eps_mse", eps_mse), ("loss", loss)):
                logged = float(row[f"train_bins/{key}_{lo:+.0f}_{hi:+.0f}"])
                assert logged == pytest.approx(values[index == j].mean(), rel=1e-6), (epoch, key, j)
                compared += 1
        assert compared >= 8
    logged_norms = {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}
    assert sorted(logged_norms) == [3, 7]  # steps 4 and 8 of 9 (log_every_n_steps=4), not the others
    assert sorted(int(r["step"]) for r in rows if r.get("train/lr")) == [3, 7]
    for step, value in logged_norms.items():
        assert value == pytest.approx(norms[step], rel=1e-5)


norms: dict[int, float] = {}


class GradNorms(Callback):
    """Lightning's ``grad_norm`` (the module's previous computation) at every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norms[trainer.global_step] = float(grad_norm(pl_module.backbone, norm_type=2)["grad_2.0_norm_total"])
