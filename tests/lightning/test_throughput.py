"""Throughput in every run: images/s, per-rank step and data times on the logging steps, FLOPs counted
once for the utilisation (logged only where the device's peak is known: not on CPU)."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from diffusionflow.lightning.throughput import training_flops_per_image
from diffusionflow.train import train
from train.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ("step_time_ms/max", "step_time_ms/min", "data_time_ms/max", "data_time_ms/min")


def _rows(run_dir: Path) -> list[dict[str, float]]:
    """The CSV rows that carry train/images_per_sec, as numbers."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [
            {k: float(v) for k, v in row.items() if v}
            for row in csv.DictReader(f)
            if row["train/images_per_sec"]
        ]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_logs_images_per_second_on_its_logging_steps(tmp_path, accumulate):
    """images/s = the images of the interval / its wall time, and ms/step = that time / its optimizer
    steps: their product is the images of a step (the batch × gradient accumulation); the intervals
    (every step of the run) fit inside the run's wall time."""
    batch, steps, every = 32, 9, 3
    overrides = [
        f"trainer.max_steps={steps}",
        f"trainer.log_every_n_steps={every}",
        f"data.batch_size={batch}",
    ]
    cfg = compose_train([*overrides, f"+trainer.accumulate_grad_batches={accumulate}"], tmp_path)
    GlobalHydra.instance().clear()
    start = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - start
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [2, 5, 8]
    for row in rows:
        speed = row["train/images_per_sec"]
        assert math.isfinite(speed) and speed > 0
        assert speed * row["train/step_time_ms/max"] / 1e3 == pytest.approx(batch * accumulate, rel=1e-5)
        assert row["train/step_time_ms/max"] == row["train/step_time_ms/min"] > 0  # one rank
        assert 0 < row["train/data_time_ms/min"] <= row["train/step_time_ms/min"]
        assert "train/mfu" not in row  # CPU: Lightning knows no peak
    assert sum(every * r["train/step_time_ms/max"] / 1e3 for r in rows) < elapsed


def test_two_processes_log_the_extremes_of_their_step_times(tmp_path):
    """``ddp_spawn`` on CPU: every rank's times are gathered on the logging steps (no hang), images are
    counted over both ranks (images/s × ms/step of the slowest = the global batch of 64)."""
    cfg = compose_train(["trainer=ddp_sim", "data.batch_size=64", "trainer.log_every_n_steps=2"], tmp_path)
    GlobalHydra.instance().clear()
    train(cfg)
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for row in rows:
        assert all(math.isfinite(row[f"train/{k}"]) and row[f"train/{k}"] > 0 for k in KEYS)
        assert row["train/step_time_ms/max"] >= row["train/step_time_ms/min"]
        assert row["train/data_time_ms/max"] >= row["train/data_time_ms/min"]
        assert row["train/images_per_sec"] * row["train/step_time_ms/max"] / 1e3 == pytest.approx(
            64, rel=1e-5
        )


class TwoLayers(nn.Module):
    """A backbone of the contract ``(z, c_noise, labels)`` with two matmuls: a → b → c features."""

    def __init__(self, a: int, b: int, c: int) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(a, b), nn.Linear(b, c)
        self.dropout = nn.Dropout(0.5)

    def forward(
        self, z: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.second(self.dropout(self.first(z)))


def test_training_flops_are_three_forward_passes_and_change_nothing():
    """Forward FLOPs of one image are 2ab + 2bc (a multiply and an add per weight); training counts 3×. The
    module stays in training mode and the global RNG where it was."""
    net = TwoLayers(5, 7, 3)
    x = torch.randn(16, 5)
    state = torch.random.get_rng_state()
    assert training_flops_per_image(net, x) == 3 * (2 * 5 * 7 + 2 * 7 * 3)
    assert net.training and torch.equal(torch.random.get_rng_state(), state)
