"""Reflow pairs made once by a pure function: ``make_reflow_pairs(parent, sampler, ...) -> .npz``.

Reflow (Liu, Gong & Liu 2022, "Flow straight and fast", arXiv:2209.03003; the blog "Diffusion Meets
Flow Matching", "Reflow"): a deterministic sampler maps each initial noise ε to a sample x = Φ(ε) of a
trained parent; a child trained on z_t = α_t x + σ_t ε with that *paired* ε (the 1-rectified flow of
the coupling (ε, Φ(ε))) learns straighter paths, which fewer steps integrate well.

Pair i is ``metrics.generate``'s sample i: seed ``seed + i`` for its noise, label i mod num_classes for
a class-conditional parent (0 otherwise). The file records what made it — the parent file (SHA-256),
its weights, the sampler, the seed, the number of pairs and the noise rule — and a file made otherwise
is refused. It also stores what the dataset needs of the parent (its data config, as JSON), so that
``diffusionflow.data.reflow_pairs.ReflowPairs`` only reads it.

``python -m diffusionflow.train`` calls :func:`prepare_reflow_pairs` before it builds the data: a
training set whose config has a ``pairs`` node gets its ``path`` from ``make_reflow_pairs(**pairs)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusionflow.checkpoint import WEIGHTS, load_module
from diffusionflow.core import samplers
from diffusionflow.core.samplers import Sampler, seeded_noise
from diffusionflow.errors import ConfigError
from diffusionflow.metrics.generate import default_labels, generate

__all__ = ["KEY", "NOISE_RULE", "check_deterministic", "make_reflow_pairs", "prepare_reflow_pairs"]

KEY = "data.train_dataset.pairs"
USAGE = (
    "train a parent first (`python -m diffusionflow.train`), then "
    f"`python -m diffusionflow.train experiment=reflow_toy2d "
    f"{KEY}.parent_ckpt=<parent run>/checkpoints/last.ckpt`"
)
DETERMINISTIC = (
    "ddim (eta=0), euler, heun, dpmpp_2m, dpmpp_3m, unipc, dpmpp_2m_sde (eta=0), edm (S_churn=0), "
    "sde (eta=0), churn (churn=0)"
)
NOISE_RULE = "per-sample seeds seed+i, labels i mod num_classes"
"""Part of the cache key: pairs made before per-sample seeds (one generator, random labels) differ."""


def check_deterministic(sampler: Sampler, key: str) -> None:
    """A ``ConfigError`` when ``sampler`` draws fresh noise, so that its sample is not a function of its
    initial noise alone and (noise, sample) would not be a deterministic coupling."""
    if sampler.stochastic:
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


def _checked(
    parent_ckpt: str | None, sampler: Mapping[str, Any], num_pairs: int, weights: str, batch_size: int
) -> tuple[Path, Sampler]:
    """The parent's path and the sampler, after every check that needs no work."""
    spec = dict(sampler)
    name = spec.pop("name", None)
    if name not in samplers.SAMPLERS:
        raise ConfigError(f"{KEY}.sampler.name={name!r} is unknown; allowed: {sorted(samplers.SAMPLERS)}")
    try:
        built = samplers.build(name, **spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{KEY}.sampler={dict(sampler)}: {err}") from err
    check_deterministic(built, f"{KEY}.sampler")
    if weights not in WEIGHTS:
        raise ConfigError(f"{KEY}.weights={weights!r} is unknown; allowed: {list(WEIGHTS)}")
    for key, value in (("num_pairs", num_pairs), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{KEY}.{key}={value} must be >= 1")
    if parent_ckpt is None:
        raise ConfigError(f"{KEY}.parent_ckpt=null: reflow needs a trained parent's checkpoint; {USAGE}")
    path = Path(parent_ckpt)
    if not path.is_file():
        raise ConfigError(f"{KEY}.parent_ckpt={parent_ckpt}: no such checkpoint file; {USAGE}")
    return path, built


def make_reflow_pairs(
    parent_ckpt: str | None,
    sampler: Mapping[str, Any],
    num_pairs: int = 50000,
    seed: int = 0,
    weights: str = "ema",
    batch_size: int = 4096,
    cache: str | None = None,
    device: str = "cpu",
) -> Path:
    """The ``.npz`` of ``num_pairs`` pairs (x, y, noise) of the parent ``parent_ckpt`` (its ``weights``)
    with the deterministic ``sampler`` (``name`` and the options of ``core.samplers.build``): pair i from
    seed ``seed + i``, label i mod num_classes (0 for an unconditional parent). ``cache``: the file; None:
    beside the parent checkpoint, named by a digest of everything that made it. An existing file made
    from the same settings is reused, one made otherwise refused. ``batch_size`` (samples per parent call)
    and ``device`` do not change the pairs."""
    path, built = _checked(parent_ckpt, sampler, num_pairs, weights, batch_size)
    key = {
        "parent_sha256": _sha256(path),
        "weights": weights,
        "sampler": repr(built),
        "t_grid": json.dumps(None if built.t_grid is None else built.t_grid.tolist()),
        "seed": str(seed),
        "num_pairs": str(num_pairs),
        "noise_rule": NOISE_RULE,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = path.with_name(f"reflow_pairs_{digest}.npz") if cache is None else Path(cache)
    if out.is_file():
        _check_cache(out, key)
        return out
    with torch.random.fork_rng(devices=[]):  # building the parent must not move the caller's RNG
        parent = load_module(path, weights, map_location=device)
    data = parent.hparams["config"]["data"]
    shape = tuple(data["shape"])
    indices = range(num_pairs)
    x = generate(parent, indices, shape=shape, batch_size=batch_size, seed_offset=seed, sampler=built)
    noise = seeded_noise([seed + i for i in indices], shape, parent.dtype)[0]
    y = default_labels(indices, parent.num_classes)
    y = torch.zeros(num_pairs, dtype=torch.int64) if y is None else y
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        x=x.numpy(),
        y=y.numpy(),
        noise=noise.numpy(),
        num_classes=int(parent.num_classes),
        parent_ckpt=str(path.resolve()),
        parent_data=json.dumps(data["train_dataset"]),
        **key,
    )
    os.replace(tmp, out)  # atomic: ranks making the same pairs never see half a file
    return out


def _check_cache(path: Path, key: Mapping[str, str]) -> None:
    """A ``ConfigError`` naming what differs when ``path`` was made from other settings than ``key``."""
    with np.load(path) as f:
        made = {k: str(f[k]) if k in f.files else "<missing>" for k in key}
        parent = str(f["parent_ckpt"]) if "parent_ckpt" in f.files else "<missing>"
    mismatch = [k for k, value in key.items() if made[k] != value]
    if mismatch:
        what = "; ".join(f"{k}: cache {made[k]!r}, asked {key[k]!r}" for k in mismatch)
        raise ConfigError(
            f"{KEY}.cache={path} was made from another parent or setting ({what}; parent file then: "
            f"{parent}). Delete it, or set {KEY}.cache to another path (null: a file beside the parent "
            "checkpoint named by the settings)"
        )


def prepare_reflow_pairs(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data.train_dataset.path`` set to the pairs file made from
    ``data.train_dataset.pairs`` (:func:`make_reflow_pairs`), or ``cfg`` itself when the training set has
    no ``pairs``. With ``dry_run`` the settings are checked and nothing is made."""
    node = OmegaConf.select(cfg, KEY)
    if node is None:
        return cfg
    settings = OmegaConf.to_container(node, resolve=True)
    if cfg.get("dry_run"):
        _checked(
            settings.get("parent_ckpt"),
            settings.get("sampler", {}),
            settings.get("num_pairs", 1),
            settings.get("weights", "ema"),
            settings.get("batch_size", 1),
        )
        return cfg
    path = make_reflow_pairs(**settings)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.train_dataset.path = str(path)
    return cfg
