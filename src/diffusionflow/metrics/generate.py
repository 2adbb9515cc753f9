"""Samples from per-sample seeds: the one generator that evaluation, sampling and reflow pairs use.

EDM's recipe (Karras et al. 2022, ``generate.py --seeds``): sample i ∈ ``indices`` has its own
``torch.Generator().manual_seed(seed_offset + i)``; its initial noise is the first draw of that generator
in the model's dtype (``core.samplers.seeded_noise``) and a stochastic sampler's fresh noise comes from
the same generator. A class-conditional model's sample i gets label ``i mod num_classes`` unless labels
are given, that is label ``(seed − seed_offset) mod K``. A sample therefore depends only on its seed
(and, for labels, its index), the weights and the sampler: not on batch size, batch order, rank or on
which caller drew it.

The model is duck-typed (:class:`GenerativeModel`): a ``DiffusionModule``, the averaged copy of its EMA,
or the exact oracle of ``diffusionflow.sample``; ``metrics`` never imports ``lightning``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from diffusionflow.core import samplers as core_samplers
from diffusionflow.core.samplers import Sampler, seeded_noise
from diffusionflow.core.schedules import Schedule

__all__ = [
    "GenerativeModel",
    "SamplerSpec",
    "default_labels",
    "generate",
    "generate_batches",
    "nfe_of",
    "parse_samplers",
    "shard",
]

SamplerSpec = str | Mapping[str, Any] | Sequence[Any]


class GenerativeModel(Protocol):
    """What generation needs of a model (``DiffusionModule`` has it all)."""

    schedule: Schedule
    sampler: Sampler
    num_classes: int
    training: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def denoiser(
        self, labels: Tensor | None = None, guidance: float | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def default_labels(indices: Sequence[int], num_classes: int) -> Tensor | None:
    """Label ``i mod num_classes`` of sample i (None for an unconditional model)."""
    return torch.tensor(list(indices), dtype=torch.int64) % num_classes if num_classes else None


@contextmanager
def _eval_mode(model: GenerativeModel) -> Iterator[None]:
    """Eval mode and no autograd inside; the model's previous mode is restored after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def generate_batches(
    model: GenerativeModel,
    indices: Sequence[int],
    *,
    shape: Sequence[int],
    batch_size: int,
    seed_offset: int = 0,
    sampler: Sampler | None = None,
    labels: Tensor | None = None,
    guidance: float | None = None,
) -> Iterator[tuple[list[int], Tensor]]:
    """Yields ``(indices, samples)`` per batch of ``batch_size`` consecutive entries of ``indices``,
    samples on ``model.device``. Sample i: seed ``seed_offset + i`` (initial and fresh noise), label
    ``labels[k]`` for the k-th entry of ``indices`` when ``labels`` is given, else ``i mod num_classes``;
    ``sampler`` None: the model's; ``guidance`` None: the model's. Each batch runs in eval mode without
    autograd, and the model's mode is restored after it."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    indices = list(indices)
    if labels is not None and len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} samples")
    if labels is not None and not model.num_classes:
        raise ValueError("labels were given to an unconditional model (data.num_classes=0)")
    sampler = model.sampler if sampler is None else sampler
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        noise, gens = seeded_noise([seed_offset + i for i in idx], shape, model.dtype)
        y = default_labels(idx, model.num_classes) if labels is None else labels[start : start + len(idx)]
        y = None if y is None else y.to(model.device)
        with _eval_mode(model):
            samples = sampler(
                model.denoiser(y, guidance), noise.to(model.device), model.schedule, generator=gens
            )
        yield idx, samples


def generate(model: GenerativeModel, indices: Sequence[int], **options: Any) -> Tensor:
    """All samples of ``generate_batches(model, indices, **options)`` in the order of ``indices``, on the
    CPU (``options``: ``shape``, ``batch_size`` and the optional ``seed_offset``, ``sampler``, ``labels``,
    ``guidance``)."""
    parts = [x.cpu() for _, x in generate_batches(model, indices, **options)]
    return torch.cat(parts) if parts else torch.zeros(0, *options["shape"], dtype=model.dtype)


def shard(n: int, rank: int, world_size: int) -> range:
    """Rank r's indices [⌊rN/W⌋, ⌊(r+1)N/W⌋): the shards cover 0..N−1 exactly once and differ in size by
    at most one (torch.tensor_split's rule); a rank may get none when N < W."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def nfe_of(sampler: Sampler, schedule: Schedule) -> int:
    """The number of denoiser calls of ``sampler`` on ``schedule`` (a dry run on one scalar with a zero
    denoiser: NFE does not depend on the data, and ranks without images still know it)."""
    sampler(
        lambda z, t: torch.zeros_like(z),
        torch.zeros(1, 1, dtype=torch.float64),
        schedule,
        generator=torch.Generator().manual_seed(0),
    )
    return sampler.nfe


def parse_samplers(specs: Sequence[SamplerSpec]) -> list[Sampler]:
    """Samplers from ``"name:steps"`` strings, ``(name, steps)`` pairs or ``{name, steps, **options}``
    dicts (options as in ``conf/sampler``), built with :func:`diffusionflow.core.samplers.build`."""
    if isinstance(specs, DictConfig | ListConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    if isinstance(specs, str | Mapping) or not specs:
        raise ValueError(f"samplers={specs!r}: expected a non-empty list of samplers")
    out = []
    for spec in specs:
        if isinstance(spec, str):
            name, _, steps = spec.partition(":")
            if not steps.isdigit():
                raise ValueError(f"sampler {spec!r}: expected name:steps, e.g. heun:18")
            kwargs: dict[str, Any] = {"name": name, "steps": int(steps)}
        elif isinstance(spec, Mapping):
            kwargs = dict(spec)
        elif isinstance(spec, Sequence) and len(spec) == 2:
            kwargs = {"name": spec[0], "steps": spec[1]}
        else:
            raise ValueError(f"sampler {spec!r}: expected 'name:steps', (name, steps) or a dict")
        if "name" not in kwargs or "steps" not in kwargs:
            raise ValueError(f"sampler {spec!r}: needs a name and steps")
        out.append(core_samplers.build(kwargs.pop("name"), **kwargs))
    return out
