"""End-of-run evaluation that needs no network: samples, a picture, and data-space metrics.

For 2-D toy data: sliced Wasserstein-2 and energy distance between generated and fresh reference
samples (exact samples for the Gaussian mixtures), the same two numbers between two reference sets
(the noise floor at this sample size, ``*_floor``), and, for mixtures, the mean exact log-density
of the generated samples beside that of exact samples. Images get a sample grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.metrics.toy import energy_distance, sliced_wasserstein

__all__ = [
    "FinalEvaluation",
    "final_evaluation",
    "generate_fixed",
    "image_grid",
    "scatter_plot",
    "toy_metrics",
]


def toy_metrics(samples: Tensor, dataset: Any, n: int, seed: int) -> dict[str, float]:
    """Distances to reference samples and their floor; exact log-densities for mixtures."""
    ref = dataset.reference_samples(n, seed=seed + 1).double()
    ref2 = dataset.reference_samples(n, seed=seed + 2).double()
    samples = samples.double()
    out = {
        "energy_distance": energy_distance(samples, ref),
        "sliced_w2": sliced_wasserstein(samples, ref),
        "energy_distance_floor": energy_distance(ref2, ref),
        "sliced_w2_floor": sliced_wasserstein(ref2, ref),
    }
    if getattr(dataset, "mixture", None) is not None:
        out["log_density"] = float(dataset.mixture.log_prob_data(samples).mean())
        out["log_density_data"] = float(dataset.mixture.log_prob_data(ref).mean())
    return out


def scatter_plot(samples: Tensor, dataset: Any, path: Path) -> None:
    """2-D samples over the law of ``dataset``: its exact log-density for mixtures, else a histogram of
    reference samples."""
    fig, ax = plt.subplots(figsize=(5, 5))
    s = samples.double().numpy()
    lim = float(np.quantile(np.abs(s), 0.995)) * 1.1 + 0.5
    mixture = getattr(dataset, "mixture", None)
    if mixture is not None:
        grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(grid, grid, indexing="xy")
        logp = mixture.log_prob_data(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
        ax.contourf(xx.numpy(), yy.numpy(), logp.clamp_min(-12).numpy(), levels=20, cmap="Blues")
    else:
        ref = dataset.reference_samples(20000, seed=12345).double().numpy()
        ax.hist2d(ref[:, 0], ref[:, 1], bins=120, range=[[-lim, lim], [-lim, lim]], cmap="Blues")
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.5, label="samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_grid(samples: Tensor, path: Path) -> None:
    """Images in [-1, 1] saved as one square grid."""
    from torchvision.utils import save_image

    save_image((samples.float() + 1) / 2, path, nrow=int(np.ceil(np.sqrt(len(samples)))), padding=1)


@torch.no_grad()
def generate_fixed(
    module: DiffusionModule, dataset: Any, num_samples: int, seed: int
) -> tuple[Tensor, Tensor | None]:
    """``num_samples`` samples (CPU) and their labels from noise fixed by ``seed``, with the module's
    sampler and current weights, in eval mode (the module's mode is restored)."""
    training = module.training
    module.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, *dataset.shape, generator=g).to(module.device)
    labels = None
    if module.num_classes:
        labels = torch.arange(num_samples, device=module.device) % module.num_classes
    samples = module.generate(noise, labels, generator=g).cpu()
    module.train(training)
    return samples, labels


@torch.no_grad()
def final_evaluation(
    module: DiffusionModule, dataset: Any, out_dir: Path, num_samples: int = 4096, seed: int = 0
) -> dict[str, float]:
    """Generates ``num_samples`` from fixed noise with the module's sampler (its current weights: EMA
    after training), writes ``samples.npz`` and ``samples.png``, and returns metrics (keys
    ``final/...``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, labels = generate_fixed(module, dataset, num_samples, seed)
    np.savez(
        out_dir / "samples.npz",
        samples=samples.numpy(),
        labels=None if labels is None else labels.cpu().numpy(),
    )
    metrics: dict[str, float] = {"nfe": float(module.sampler.nfe)}
    if len(dataset.shape) == 1:
        metrics.update(toy_metrics(samples, dataset, num_samples, seed))
        scatter_plot(samples, dataset, out_dir / "samples.png")
    else:
        image_grid(samples[:100].clamp(-1, 1), out_dir / "samples.png")
    metrics = {f"final/{k}": v for k, v in metrics.items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


class FinalEvaluation(Callback):
    """Runs ``final_evaluation`` on rank 0 when fit ends (after the EMA weights were copied in), logs
    its metrics to every logger and leaves them in ``trainer.callback_metrics``.

    With ``every_n_steps``, 2-D data are also measured during training, on rank 0, with the EMA
    weights (after that step's EMA update) and the same noise: ``toy/{sliced_w2,energy_distance,
    log_density}`` at each multiple of ``every_n_steps``, to the loggers only (the curves of
    ``diffusionflow.compare``'s ``metric_vs_step.png``). At the last step they equal the ``final/``
    values. No collective is involved, so the other ranks do not wait."""

    def __init__(self, num_samples: int = 4096, seed: int = 0, every_n_steps: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"callbacks.final_eval.num_samples={num_samples} must be >= 1")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.final_eval.every_n_steps={every_n_steps} must be >= 1 or null")
        self.num_samples, self.seed, self.every_n_steps = num_samples, seed, every_n_steps
        self.ema: WeightAveraging | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.ema = next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or not trainer.is_global_zero:
            return
        dataset = trainer.datamodule.train_set
        if len(dataset.shape) != 1:
            return
        model = pl_module if self.ema is None else self.ema._average_model.module
        samples, _ = generate_fixed(model, dataset, self.num_samples, self.seed)
        metrics = toy_metrics(samples, dataset, self.num_samples, self.seed)
        logged = {f"toy/{k}": v for k, v in metrics.items() if not k.endswith(("_floor", "_data"))}
        for lg in trainer.loggers:
            lg.log_metrics(logged, step=step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        out_dir = Path(trainer.default_root_dir)
        metrics = final_evaluation(
            pl_module, trainer.datamodule.train_set, out_dir, self.num_samples, self.seed
        )
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
