"""The EMA adapter: the one place that reads Lightning's private averaged model. These tests fail loudly
when a Lightning upgrade moves it or changes what it holds."""

from __future__ import annotations

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from diffusionflow.checkpoint import build_module
from diffusionflow.lightning.ema import EMA, averaged_model, raw_weights
from diffusionflow.lightning.internals import averaging
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY, STEPS = 0.8, 4


class RawRecorder(Callback):
    """The raw backbone weights after every optimizer step (EMA does not touch them during training)."""

    def __init__(self) -> None:
        self.raw: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.raw.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    cfg = compose_train(["data.batch_size=64"], out)
    GlobalHydra.instance().clear()
    module, datamodule = build_module(cfg), instantiate(cfg.data)
    ema, recorder = EMA(decay=DECAY), RawRecorder()
    averaged: dict[str, torch.Tensor] = {}

    class BeforeEnd(Callback):
        """The adapter's weights during training, before the end-of-training copy."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == STEPS:
                averaged.update({k: v.clone() for k, v in averaged_model(ema).backbone.state_dict().items()})

    trainer = Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        callbacks=[recorder, ema, BeforeEnd()],  # the recorder before the EMA: order must not matter
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=datamodule)
    return module, ema, recorder.raw, averaged


def _ema_of(raw: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """e_1 = w_1, e_k = β e_(k−1) + (1 − β) w_k."""
    out = dict(raw[0])
    for weights in raw[1:]:
        out = {k: torch.lerp(weights[k], out[k], DECAY) for k in out}
    return out


def test_averaged_model_is_the_ema_of_the_raw_weights(fitted):
    module, ema, raw, averaged = fitted
    assert len(raw) == STEPS
    model = averaged_model(ema)
    assert model is not module and type(model) is type(module)
    expected = _ema_of(raw)
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-6, atol=1e-7)  # during training
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=1e-6, atol=1e-7)  # after
    assert any(not torch.equal(expected[k], raw[-1][k]) for k in expected)  # EMA ≠ raw


def test_train_end_copy_keeps_the_raw_weights(fitted):
    """After fit the module holds the averaged weights; ``raw_weights`` puts the raw ones back meanwhile."""
    module, ema, raw, _ = fitted
    expected = _ema_of(raw)
    for key, value in expected.items():
        torch.testing.assert_close(module.backbone.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    with raw_weights(ema, module) as current:
        assert current is module
        for key, value in raw[-1].items():
            assert torch.equal(module.backbone.state_dict()[key], value)
    for key, value in expected.items():  # restored
        torch.testing.assert_close(module.backbone.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_a_lightning_without_the_attribute_fails_loudly():
    moved = EMA(decay=DECAY)
    del moved._average_model
    with pytest.raises(
        RuntimeError, match=r"lightning 2\.\d+.*_average_model.*update diffusionflow.lightning.internals"
    ):
        averaged_model(moved)
    with pytest.raises(RuntimeError, match="no averaged model yet"):
        averaged_model(EMA(decay=DECAY))


class WithBuffers(LightningModule):
    """A linear map with a floating buffer that moves every step (averaged like a weight) and an integer
    one (copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(3))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def training_step(self, batch, batch_idx):
        self.running.mul_(0.5).add_(batch[0].mean(0))
        self.seen += len(batch[0])
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(80, 3, generator=torch.Generator().manual_seed(0))), 8)


def test_the_foreach_update_is_the_per_tensor_ema_of_parameters_and_buffers(tmp_path):
    """The previous update, ``torch.lerp(w, ê, β(n))`` per tensor with n the updates done (n ≥ 1; the
    first copies), over the parameters and floating buffers: equal to float precision after every step,
    with a β that changes each step (ramp-up) and an update every 2 steps."""
    ema = EMA(half_life_images=40, rampup_ratio=0.5, update_every_n_steps=2)
    seen: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            seen.append((raw, {k: v.clone() for k, v in averaged_model(ema).state_dict().items()}))

    trainer = Trainer(
        max_steps=9,
        accelerator="cpu",
        callbacks=[ema, Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(WithBuffers())
    expected, updates = None, 0
    for step, (raw, averaged) in enumerate(seen):
        if step % 2 == 0:  # updates after optimizer steps 1, 3, 5, …
            if expected is None:
                expected = dict(raw)
            else:
                beta = ema.beta(updates)
                expected = {
                    k: torch.lerp(v, expected[k], beta) if v.is_floating_point() else v
                    for k, v in raw.items()
                }
            updates += 1
        for key, value in expected.items():
            torch.testing.assert_close(averaged[key], value, rtol=1e-6, atol=1e-7, msg=f"step {step} {key}")
    assert int(averaging(ema).n_averaged) == updates == 5
    assert len({ema.beta(n) for n in range(1, updates)}) == updates - 1  # β moved: the test has teeth
    assert not torch.equal(expected["running"], seen[-1][0]["running"])  # the buffer is averaged
    assert int(expected["seen"]) == 72  # the integer buffer is copied (9 batches of 8)
