"""The reflow report: is the child (trained on a parent's (noise, sample) pairs) straighter, and better
in few steps, than its parent?

For the child (its current weights: the EMA weights when fit ends, as trained) and the parent (the
weights that made the pairs), from the same seeds (``metrics.generate``: sample i from seed
``seed + i``, label i mod num_classes):

* ``straightness``: the mean per-dimension straightness of the probability-flow path (Liu et al. 2022;
  ``core.straightness``), schedule-invariant, so parent and child compare whatever their schedules;
* for each k in ``steps``: samples of DDIM with k steps on the flow-time grid (= flow-matching Euler
  with k uniform steps), scored against exact reference samples of the parent's data law by
  ``metrics.toy_samples.toy_metrics`` (sliced W2, energy distance and, for mixtures, the exact
  log-density).

Written to ``reflow.json`` in the run folder and logged as ``reflow/<child|parent>_<metric>`` (with
``_<k>step`` for sample metrics); what concerns the reference samples only (the distances' floors, the
data's mean log-density) once, as ``reflow/<metric>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffusionflow.core.samplers import DDIM, seeded_noise
from diffusionflow.core.straightness import flow_time_grid, straightness
from diffusionflow.data.reflow_pairs import ReflowPairs
from diffusionflow.errors import ConfigError
from diffusionflow.metrics.generate import GenerativeModel, default_labels, generate
from diffusionflow.metrics.toy_samples import toy_metrics

__all__ = ["ReflowReport", "reflow_metrics"]

REFERENCE = ("energy_distance_floor", "sliced_w2_floor", "log_density_data")
"""``toy_metrics`` keys about the reference samples only: reported once, not per model and k."""


def reflow_metrics(
    module: GenerativeModel,
    dataset: Any,
    num_samples: int,
    steps: Sequence[int],
    straightness_steps: int,
    seed: int,
) -> dict[str, float]:
    """Straightness of ``module`` from the noise of seeds ``seed``, …, ``seed + num_samples − 1`` and,
    for 1-D data shapes, ``toy_metrics`` of its k-step flow-matching Euler samples from the same seeds
    for k in ``steps`` (keys ``<metric>_<k>step``; ``REFERENCE`` once). The module's mode is restored."""
    indices = range(num_samples)
    noise = seeded_noise([seed + i for i in indices], dataset.shape, module.dtype)[0].to(module.device)
    labels = default_labels(indices, module.num_classes)
    labels = None if labels is None else labels.to(module.device)
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            path = straightness(module.denoiser(labels), noise, module.schedule, straightness_steps)
    finally:
        module.train(training)
    out = {"straightness": float(path.mean())}
    if len(dataset.shape) != 1:
        return out
    for k in steps:
        sampler = DDIM(t_grid=flow_time_grid(module.schedule, k))
        samples = generate(
            module, indices, shape=dataset.shape, batch_size=num_samples, seed_offset=seed, sampler=sampler
        )
        metrics = toy_metrics(samples, dataset, num_samples, seed)
        out.update({key: v for key, v in metrics.items() if key in REFERENCE})
        out.update({f"{key}_{k}step": v for key, v in metrics.items() if key not in REFERENCE})
    return out


class ReflowReport(Callback):
    """When fit ends, on rank 0: ``reflow_metrics`` of the child and of the parent of the run's
    ``ReflowPairs`` from seeds ``seed``, …, ``seed + num_samples − 1``; ``reflow.json`` and the loggers.

    Args:
        load_parent: ``load_parent(path, weights, map_location=device)`` gives the parent model (in the
            config, ``diffusionflow.checkpoint.load_module`` as a Hydra partial: a callback does not import
            the entry points' checkpoint loader).
    """

    def __init__(
        self,
        load_parent: Callable[..., GenerativeModel],
        num_samples: int = 4096,
        steps: Sequence[int] = (1, 2),
        straightness_steps: int = 256,
        seed: int = 0,
    ) -> None:
        if num_samples < 1 or straightness_steps < 1 or not steps or min(steps) < 1:
            raise ConfigError(
                f"callbacks.reflow: num_samples={num_samples}, straightness_steps={straightness_steps} and "
                f"steps={list(steps)} must be >= 1 (steps a non-empty list)"
            )
        self.load_parent = load_parent
        self.num_samples, self.steps = num_samples, [int(k) for k in steps]
        self.straightness_steps, self.seed = straightness_steps, seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pairs = getattr(trainer.datamodule, "train_set", None)
        if not isinstance(pairs, ReflowPairs):
            raise ConfigError(
                f"callbacks.reflow compares a reflowed model with its parent, but data.train_dataset is "
                f"{type(pairs).__name__}; allowed: diffusionflow.data.reflow_pairs.ReflowPairs (data=reflow)"
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        pairs: ReflowPairs = trainer.datamodule.train_set
        parent = self.load_parent(pairs.parent_ckpt, pairs.weights, map_location=pl_module.device)
        args = (pairs, self.num_samples, self.steps, self.straightness_steps, self.seed)
        report = {
            name: reflow_metrics(module, *args) for name, module in (("child", pl_module), ("parent", parent))
        }
        reference = {k: v for k, v in report["parent"].items() if k in REFERENCE}
        report = {
            name: {k: v for k, v in values.items() if k not in REFERENCE} for name, values in report.items()
        }
        meta = {
            "parent_ckpt": str(pairs.parent_ckpt),
            "pairs": {"cache": str(pairs.path), **pairs.provenance},
            "num_samples": self.num_samples,
            "straightness_steps": self.straightness_steps,
        }
        out_dir = Path(trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "reflow.json").write_text(json.dumps({**report, "reference": reference, **meta}, indent=2))
        metrics = {f"reflow/{k}": v for k, v in reference.items()}
        for name, values in report.items():
            metrics.update({f"reflow/{name}_{k}": v for k, v in values.items()})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
