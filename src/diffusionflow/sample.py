"""Sample a trained model or the exact mixture oracle: ``python -m diffusionflow.sample [overrides]``.

    python -m diffusionflow.sample ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt sampler=dpmpp_2m
    python -m diffusionflow.sample oracle=blog schedule=cosine sampler=ddpm sampler.steps=100

The sampler is chosen here, independently of training: any ``conf/sampler`` option and its keys. A
checkpoint samples with its EMA weights (``weights=ema``, the default) or its raw ones (``weights=raw``)
and with the schedule and prediction it was trained with; ``oracle=<mixture>`` is the exact denoiser of
a toy Gaussian mixture under ``schedule`` (default flow), in float64 on the CPU, with no network.

Writes to ``out_dir`` (default ``logs/sample/runs/<date>_<time>/``): ``samples.npz`` (``samples``,
``labels`` of a class-conditional model, and ``nfe``, ``sampler``, ``steps``, ``seed``, ``weights``,
``source``), ``samples.png`` (a scatter over the true law for 2-D data, an image mosaic otherwise) and,
for 2-D toy laws, ``metrics.json`` with the toy metrics of training's final evaluation.

Noise: sample i has its own seed, ``seed + i``, through the generator that training's evaluation, the
FID callback, ``evaluate`` and reflow pairs use (``diffusionflow.metrics.generate``): its initial noise
(drawn in the model's dtype) and a stochastic sampler's fresh noise come from that generator alone, so a
sample depends neither on ``batch_size`` nor on ``num_samples`` (a larger run extends a smaller one).
The sampler runs on batches of ``batch_size`` samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor

from diffusionflow.checkpoint import check_weights, load_module
from diffusionflow.checks import SAMPLE, check_config, check_device
from diffusionflow.config import instantiate_checked
from diffusionflow.core.samplers import Denoiser, Sampler
from diffusionflow.core.schedules import Schedule
from diffusionflow.data.toy2d import MIXTURES, Toy2D
from diffusionflow.errors import ConfigError
from diffusionflow.metrics.generate import GenerativeModel, generate
from diffusionflow.metrics.pictures import image_mosaic, scatter_plot
from diffusionflow.metrics.toy_samples import toy_metrics
from diffusionflow.paths import CONFIG_DIR, CONFIG_PKG

__all__ = ["main", "sample", "validate"]

IMAGES_IN_MOSAIC = 100


class Oracle:
    """The exact denoiser of a Gaussian mixture under ``schedule``, as a model for ``metrics.generate``:
    unconditional, float64, on the CPU."""

    num_classes = 0
    training = False
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, law: Toy2D, schedule: Schedule, sampler: Sampler) -> None:
        self.law, self.schedule, self.sampler = law, schedule, sampler

    def denoiser(self, labels: Tensor | None = None, guidance: float | None = None) -> Denoiser:
        def exact(z: Tensor, t: Tensor) -> Tensor:
            return self.law.mixture.x_hat(z, t, self.schedule)

        return exact

    def eval(self) -> Oracle:
        return self

    def train(self, mode: bool = True) -> Oracle:
        return self


@dataclass(frozen=True)
class Source:
    """What is sampled: ``model`` (a checkpoint's module or the oracle) with ``labels`` per sample."""

    description: str
    weights: str
    model: GenerativeModel
    shape: tuple[int, ...]
    labels: Tensor | None = None
    guidance: float | None = None
    law: Any = None
    """A dataset with ``reference_samples`` (and ``mixture`` when exact) for 2-D data, else None."""


def _overrides(group: str) -> list[str]:
    """The command-line overrides of ``group`` or of its keys."""
    if not HydraConfig.initialized():
        return []
    return [
        o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~").split(".")[0] == group
    ]


def validate(cfg: DictConfig) -> None:
    """Checks of the sampling keys (types and ranges: ``checks.SAMPLE``; ``device`` against this machine's
    devices), before anything is loaded; the sampler, checkpoint and labels are checked when built."""
    if (cfg.ckpt_path is None) == (cfg.oracle is None):
        raise ConfigError(
            "give exactly one of ckpt_path (a checkpoint of diffusionflow.train) and oracle (one of "
            f"{list(MIXTURES)}); got ckpt_path={cfg.ckpt_path} and oracle={cfg.oracle}"
        )
    check_config(cfg, SAMPLE)
    check_weights(cfg.weights)
    check_device(cfg.device)
    if cfg.oracle is not None and cfg.oracle not in MIXTURES:
        raise ConfigError(f"oracle={cfg.oracle!r} has no exact denoiser; allowed: {list(MIXTURES)}")
    if cfg.oracle is not None and "_target_" not in cfg.schedule:
        options = sorted(p.stem for p in (CONFIG_DIR / "schedule").glob("*.yaml") if p.stem != "canonical")
        name = cfg.schedule.get("name")
        raise ConfigError(f"schedule={name} means a weighting's schedule; the oracle needs one of {options}")
    schedule_overrides = _overrides("schedule")
    if cfg.ckpt_path is not None and schedule_overrides:
        raise ConfigError(
            f"{' '.join(schedule_overrides)}: schedule is for oracle= only; ckpt_path={cfg.ckpt_path} "
            "samples with the schedule it was trained with"
        )


def _labels(cfg: DictConfig, num_classes: int, description: str) -> Tensor | None:
    """The class of every sample (None for an unconditional source), after checking ``labels`` and
    ``guidance`` against ``num_classes``."""
    if num_classes == 0:
        if cfg.labels is not None or cfg.guidance not in (None, 1.0):
            key = "labels" if cfg.labels is not None else "guidance"
            raise ConfigError(
                f"{key}={cfg[key]} needs a class-conditional model, but {description} is unconditional; "
                f"allowed: {key}=null"
            )
        return None
    spec = cfg.labels
    classes = list(range(num_classes)) if spec is None else [spec] if isinstance(spec, int) else list(spec)
    if not classes or not all(isinstance(c, int) and 0 <= c < num_classes for c in classes):
        raise ConfigError(f"labels={cfg.labels} must be class indices in [0, {num_classes})")
    return torch.tensor(classes)[torch.arange(cfg.num_samples) % len(classes)]


def _checkpoint_source(cfg: DictConfig) -> Source:
    device = check_device(cfg.device)
    module = load_module(cfg.ckpt_path, cfg.weights, map_location=device, sampler=cfg.sampler)
    description = f"checkpoint {cfg.ckpt_path}"
    labels = _labels(cfg, module.num_classes, description)
    if labels is not None:
        labels = labels.to(device)
    data = module.hparams["config"]["data"]
    shape = tuple(data["shape"])
    law = instantiate_checked(data["train_dataset"], "data.train_dataset")() if len(shape) == 1 else None
    return Source(
        description=description,
        weights=cfg.weights,
        model=module,
        shape=shape,
        labels=labels,
        guidance=module.guidance if cfg.guidance is None else float(cfg.guidance),
        law=law,
    )


def _oracle_source(cfg: DictConfig) -> Source:
    description = f"oracle {cfg.oracle}"
    _labels(cfg, 0, description)  # the oracle is unconditional: rejects labels and guidance
    law = Toy2D(cfg.oracle, n=1)  # only its law is used: mixture and reference_samples
    schedule: Schedule = instantiate_checked(cfg.schedule, "schedule")
    return Source(
        description=description,
        weights="exact",
        model=Oracle(law, schedule, instantiate_checked(cfg.sampler, "sampler")),
        shape=(law.mixture.dim,),
        law=law,
    )


def _write(out_dir: Path, samples: Tensor, source: Source, cfg: DictConfig) -> dict[str, float]:
    """samples.npz, samples.png and, for 2-D data, metrics.json (whose metrics are returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = source.model.sampler
    arrays: dict[str, Any] = {
        "samples": samples.numpy(),
        "nfe": sampler.nfe,
        "sampler": sampler.name,
        "sampler_options": repr(sampler),
        "steps": sampler.steps,
        "seed": cfg.seed,
        "weights": source.weights,
        "source": source.description,
    }
    if source.labels is not None:
        arrays |= {"labels": source.labels.cpu().numpy(), "guidance": source.guidance}
    np.savez(out_dir / "samples.npz", **arrays)
    if source.law is None:
        image_mosaic(samples[:IMAGES_IN_MOSAIC].clamp(-1, 1), out_dir / "samples.png")
        return {}
    scatter_plot(samples, source.law, out_dir / "samples.png")
    metrics = {"nfe": float(sampler.nfe), **toy_metrics(samples, source.law, len(samples), cfg.seed)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def sample(cfg: DictConfig) -> dict[str, float]:
    """Checks ``cfg``, samples, writes the outputs to ``cfg.out_dir``; returns the toy metrics (or {})."""
    validate(cfg)
    source = _oracle_source(cfg) if cfg.oracle is not None else _checkpoint_source(cfg)
    n = int(cfg.num_samples)
    samples = generate(
        source.model,
        range(n),
        shape=source.shape,
        batch_size=int(cfg.batch_size),
        seed_offset=int(cfg.seed),
        labels=source.labels,
        guidance=source.guidance,
    )
    out_dir = Path(cfg.out_dir)
    metrics = _write(out_dir, samples, source, cfg)
    sampler = source.model.sampler
    print(
        f"{n} samples from {source.description} ({source.weights}) with {sampler.name}, "
        f"{sampler.steps} steps, NFE {sampler.nfe} -> {out_dir / 'samples.npz'}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PKG, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
