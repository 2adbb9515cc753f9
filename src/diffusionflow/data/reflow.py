"""Reflow pairs: (noise, sample) couplings of a trained parent (Liu, Gong & Liu 2022, "Flow straight and
fast", arXiv:2209.03003, "reflow"; the blog "Diffusion Meets Flow Matching", "Reflow").

A deterministic sampler maps each initial noise ε to a sample x = Φ(ε) of the parent; a model trained on
z_t = α_t x + σ_t ε with that *paired* ε (the 1-rectified flow of the coupling (ε, Φ(ε))) learns
straighter paths than the parent, which fewer steps integrate well. The pairs are generated once,
from seeded noise, and cached in an ``.npz`` that records what made them: the parent file (SHA-256),
its weights, the sampler, the seed and the number of pairs. A cache made otherwise is refused.

``ReflowPairs`` is a dataset of the ``diffusionflow.data`` contract (a zero-argument factory for
``DiffusionDataModule`` through ``_partial_: true``) whose items are ``(x, y, noise)``; ``shape``,
``num_classes``, ``reference_samples`` and ``mixture`` are those of the parent's own training set, built
from the run config saved in its checkpoint, so evaluation compares with the parent's data law.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from diffusionflow.config import ConfigError, instantiate_checked
from diffusionflow.core import samplers
from diffusionflow.core.samplers import DDIM, DDPM, SDE, Churn, EDMSampler, Sampler

__all__ = ["KEY", "ReflowPairs", "check_deterministic"]

KEY = "data.train_dataset"
USAGE = (
    "train a parent first (`python -m diffusionflow.train`), then "
    f"`python -m diffusionflow.train experiment=reflow_toy2d "
    f"{KEY}.parent_ckpt=<parent run>/checkpoints/last.ckpt`"
)
DETERMINISTIC = "ddim (eta=0), euler, heun, dpmpp_2m, edm (S_churn=0), sde (eta=0), churn (churn=0)"


def check_deterministic(sampler: Sampler, key: str) -> None:
    """A ``ConfigError`` when ``sampler`` draws fresh noise, so that its sample is not a function of its
    initial noise alone and (noise, sample) would not be a deterministic coupling."""
    fresh = (
        isinstance(sampler, DDPM)
        or (isinstance(sampler, DDIM) and sampler.eta > 0)
        or (isinstance(sampler, EDMSampler) and sampler.S_churn > 0)
        or (
            isinstance(sampler, SDE) and (sampler.eta if sampler.diffusion is None else sampler.diffusion) > 0
        )
        or (isinstance(sampler, Churn) and sampler.churn > 0)
    )
    if fresh:
        raise ConfigError(
            f"{key}={sampler!r} draws fresh noise while sampling: reflow pairs need a deterministic "
            f"sampler; allowed: {DETERMINISTIC}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReflowPairs(Dataset):
    """``num_pairs`` items ``(x, y, noise)``: noise ~ N(0, I) drawn with ``seed``, y a uniform class (0 for
    unconditional parents), x the parent's sample from that noise with the deterministic ``sampler``.

    Args:
        parent_ckpt: a checkpoint of ``diffusionflow.train``.
        sampler: ``name`` and the options of ``core.samplers.build``, e.g. ``{name: heun, steps: 32}``.
        weights: the parent's ``ema`` or ``raw`` weights.
        batch_size: samples per parent call while generating (the pairs do not depend on it).
        cache: the ``.npz`` of the pairs; None: beside the parent checkpoint, named by a digest of
            everything that made it, so that other settings get another file.
        device: where the parent generates.
    """

    def __init__(
        self,
        parent_ckpt: str | None,
        sampler: Mapping[str, Any],
        num_pairs: int = 50000,
        seed: int = 0,
        weights: str = "ema",
        batch_size: int = 4096,
        cache: str | None = None,
        device: str = "cpu",
    ) -> None:
        # Imported here: the checkpoint loader builds a LightningModule, a layer above ``data``.
        from diffusionflow.checkpoint import WEIGHTS, load_module

        spec = dict(sampler)
        name = spec.pop("name", None)
        if name not in samplers.SAMPLERS:
            raise ConfigError(f"{KEY}.sampler.name={name!r} is unknown; allowed: {sorted(samplers.SAMPLERS)}")
        try:
            self.sampler = samplers.build(name, **spec)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{KEY}.sampler={dict(sampler)}: {err}") from err
        check_deterministic(self.sampler, f"{KEY}.sampler")
        if weights not in WEIGHTS:
            raise ConfigError(f"{KEY}.weights={weights!r} is unknown; allowed: {list(WEIGHTS)}")
        for key, value in (("num_pairs", num_pairs), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"{KEY}.{key}={value} must be >= 1")
        if parent_ckpt is None:
            raise ConfigError(f"{KEY}.parent_ckpt=null: reflow needs a trained parent's checkpoint; {USAGE}")
        self.parent_ckpt = Path(parent_ckpt)
        if not self.parent_ckpt.is_file():
            raise ConfigError(f"{KEY}.parent_ckpt={parent_ckpt}: no such checkpoint file; {USAGE}")
        self.weights, self.seed, self.num_pairs, self.batch_size = weights, seed, num_pairs, batch_size
        self.provenance = {
            "parent_sha256": _sha256(self.parent_ckpt),
            "weights": weights,
            "sampler": repr(self.sampler),
            "t_grid": json.dumps(None if self.sampler.t_grid is None else self.sampler.t_grid.tolist()),
            "seed": str(seed),
            "num_pairs": str(num_pairs),
        }
        digest = hashlib.sha256(json.dumps(self.provenance, sort_keys=True).encode()).hexdigest()[:12]
        self.cache = (
            self.parent_ckpt.with_name(f"reflow_pairs_{digest}.npz") if cache is None else Path(cache)
        )
        self.parent = load_module(self.parent_ckpt, weights, map_location=device)
        config = self.parent.hparams["config"]
        self.parent_data = instantiate_checked(
            OmegaConf.create(config["data"]["train_dataset"]), "parent's data.train_dataset"
        )()
        self.shape: tuple[int, ...] = tuple(self.parent_data.shape)
        self.num_classes: int = int(self.parent_data.num_classes)
        self.mixture = getattr(self.parent_data, "mixture", None)
        self.x, self.y, self.noise = self._pairs()

    def reference_samples(self, n: int, seed: int) -> Tensor:
        """Fresh points of the parent's data law (its training set's ``reference_samples``)."""
        return self.parent_data.reference_samples(n, seed)

    def _pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.cache.is_file():
            return self._read_cache()
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_pairs, *self.shape, generator=g)
        if self.num_classes:
            y = torch.randint(self.num_classes, (self.num_pairs,), generator=g)
        else:
            y = torch.zeros(self.num_pairs, dtype=torch.int64)
        x = torch.cat(
            [
                self.parent.generate(
                    noise[i : i + self.batch_size].to(self.parent.device),
                    y[i : i + self.batch_size].to(self.parent.device) if self.num_classes else None,
                    sampler=self.sampler,
                ).cpu()
                for i in range(0, self.num_pairs, self.batch_size)
            ]
        )
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_name(f"{self.cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            x=x.numpy(),
            y=y.numpy(),
            noise=noise.numpy(),
            parent_ckpt=str(self.parent_ckpt.resolve()),
            **self.provenance,
        )
        os.replace(tmp, self.cache)  # atomic: ranks generating the same pairs never see half a file
        return x, y, noise

    def _read_cache(self) -> tuple[Tensor, Tensor, Tensor]:
        with np.load(self.cache) as f:
            made = {key: str(f[key]) if key in f else "<missing>" for key in self.provenance}
            mismatch = [key for key, value in self.provenance.items() if made[key] != value]
            if mismatch:
                what = "; ".join(f"{k}: cache {made[k]!r}, asked {self.provenance[k]!r}" for k in mismatch)
                raise ConfigError(
                    f"{KEY}.cache={self.cache} was made from another parent or setting ({what}; parent "
                    f"file then: {f.get('parent_ckpt')}). Delete it, or set {KEY}.cache to another path "
                    "(null: a file beside the parent checkpoint named by the settings)"
                )
            return torch.from_numpy(f["x"]), torch.from_numpy(f["y"]), torch.from_numpy(f["noise"])

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[index], self.y[index], self.noise[index]
