"""Every private Lightning attribute we use (``lightning.internals``) exists on a real Trainer: this test
fails on a Lightning upgrade that moves one, instead of a run doing the wrong thing."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffusionflow.lightning import internals
from diffusionflow.lightning.ema import EMA


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=8)


def _trainer(tmp_path, **kw) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_averaged_model_is_a_separate_module_updated_by_the_callback(tmp_path):
    ema = EMA(decay=0.5)
    module = Tiny()
    _trainer(tmp_path, max_steps=3, callbacks=[ema]).fit(module)
    averaged = internals.averaged_model(ema)
    assert isinstance(averaged, Tiny) and averaged is not module


def test_request_stop_stops_the_fit_loop_like_sigterm(tmp_path):
    class StopAt2(Tiny):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == 2:
                internals.request_stop(self.trainer)

    trainer = _trainer(tmp_path, max_steps=50)
    with pytest.raises(SIGTERMException):
        trainer.fit(StopAt2())
    assert trainer.global_step == 2


def test_cluster_environment_and_hpc_path(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    assert isinstance(internals.cluster_environment(trainer), ClusterEnvironment)
    assert internals.hpc_save_path(trainer).startswith(str(tmp_path))
    assert internals.hpc_save_path(trainer).endswith(".ckpt")
    assert callable(trainer._signal_connector._slurm_sigusr_handler_fn)  # what slurm_requeue calls


def test_a_missing_attribute_fails_loudly():
    with pytest.raises(RuntimeError, match="update diffusionflow.lightning.internals"):
        internals.request_stop(object())  # type: ignore[arg-type]


def test_logs_this_step_is_true_exactly_on_the_steps_whose_metrics_are_written(tmp_path):
    """With gradient accumulation (2 batches a step) and log_every_n_steps=3: the optimizer steps where
    ``logs_this_step`` holds are the steps of the CSV rows of a metric logged on every batch."""
    asked: dict[int, bool] = {}

    class Logged(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("every", loss, on_step=True, on_epoch=False)
            return loss

        def on_before_optimizer_step(self, optimizer):
            asked[self.trainer.global_step] = internals.logs_this_step(self.trainer)

    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv", version=""),
        max_steps=7,
        accumulate_grad_batches=2,
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Logged())
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        written = sorted(int(row["step"]) for row in csv.DictReader(f) if row.get("every"))
    assert sorted(asked) == list(range(7))
    assert written == [step for step, yes in asked.items() if yes] == [2, 5]


def test_weight_averaging_state_is_reachable(tmp_path):
    ema = EMA(decay=0.5)
    _trainer(tmp_path, max_steps=3, callbacks=[ema]).fit(Tiny())
    assert int(internals.averaging(ema).n_averaged) == 3
    assert internals.latest_update_step(ema) == 3
    assert internals.latest_update_step(ema, 5) == 5 == ema._latest_update_step
