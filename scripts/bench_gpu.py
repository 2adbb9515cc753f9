"""GPU benchmark of the CIFAR-10 network: training (Lightning vs a bare loop), host syncs, sampling, features.

    python scripts/bench_gpu.py [--out DIR] [--steps N] [--warmup N] [--sync-steps N] [--budget S]
                                [--no-compile] [--cpu-smoke]

On one CUDA GPU, for the ``ddpmpp_cifar`` backbone (``conf/backbone/ddpmpp_cifar.yaml``, DDPM++ 56M,
unconditional, 3 × 32 × 32) with the EDM weighting and its canonical schedule, preconditioning and
log-normal proposal (``experiment=cifar10_edm``), batch 128 per GPU, ``bf16-mixed``, channels_last,
Adam lr 1e-3, each of these eager and under ``torch.compile`` (the backbone compiled in place, as
``model.compile=true`` does):

* training images/s of the three contenders of ``scripts/bench_train.py`` (whose functions this script
  imports: the components, the backbone, the data and its loader, the noise, ``train.py``'s extras):
  ``bare``, a plain PyTorch loop drawing λ and ε as ``DiffusionModule`` does; ``lightning``,
  ``DiffusionModule`` under a ``Trainer``; ``lightning + train.py extras``, with the EMA callback, a
  CSV logger and ``log_every_n_steps``; and their ratios to ``bare``. The first ``--warmup`` steps
  (compilation included: the first compiled contender pays it, the others reuse dynamo's cache, as
  the bare loop and Lightning run the same graph under the same autocast) are timed apart and
  reported; then up to ``--steps`` steps are timed, or as many as fit in ``--budget`` seconds. The
  device is synchronised at the two ends of the timed window only, so a step that does not wait for
  the device is not made to;
* the peak memory of each contender's run (``torch.cuda.max_memory_allocated``, counters reset
  before it);
* host syncs: ``--sync-steps`` further steps run under ``torch.cuda.set_sync_debug_mode("warn")``,
  and the warnings are counted per step (the goal on a step whose metrics are not logged is 0);
  steps whose metrics reach the loggers (``trainer.log_every_n_steps``) are counted apart;
* Heun-35 sampling images/s (eager): ``heun``, 18 steps on the EDM grid (NFE 35, as counted), through
  ``DiffusionModule.generate`` (its denoiser) under bf16 autocast, batch 256;
* Inception feature images/s (eager): the FID extractor (``metrics.build_extractor("fid")``,
  torch-fidelity's Inception-v3 in float32) on uint8 32 × 32 images, batch 256; with torch.hub's
  cached weights file when present, otherwise a random-init (He-normal) one written here: the cost
  does not depend on the values.

Every training contender starts from a copy of the same weights and trains on the same random batches
(in host memory, moved to the device per step as Lightning does, ``non_blocking``). cuDNN and matmul
settings are left as ``train.py`` leaves them. Prints one Markdown table with the date, GPU, torch and
Lightning versions, and writes it to ``--out``/bench_gpu.md with every figure in bench_gpu.json
(rewritten after each measurement, so a run cut short keeps what it measured). A measurement that
fails is reported as ``error`` (traceback on stderr) and the exit status is 1. Finishes in a few
minutes on one H200; most of it is compilation.

Anchor: EDM trained this network at about 145 images/s per V100 in fp32 (200 Mimg in ~2 days on 8
GPUs, Karras et al. 2022).

``--cpu-smoke`` runs the same code on the CPU with a tiny configuration (the ``unet_tiny`` preset on
3 × 8 × 8, batch 4, a few steps, ``torch.compile`` with dynamo's ``eager`` backend, no host-sync check:
there is no CUDA): a test of the script, not a measurement. Without a GPU and without ``--cpu-smoke``
the script exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import bench_train
from bench_train import BARE, CONTENDERS, LR, SEED, TRAIN_PY
from diffusionflow.core.components import Components
from diffusionflow.core.objective import Objective
from diffusionflow.core.samplers import Sampler
from diffusionflow.lightning.internals import logs_this_step
from diffusionflow.lightning.module import DiffusionModule
from diffusionflow.metrics.extractors import PRETRAINED, build_extractor, save_random_inception_weights
from diffusionflow.paths import replace_atomically

WEIGHTING = "edm"  # experiment=cifar10_edm: EDM weighting, schedule, preconditioning, log-normal proposal
PRECISION = "bf16-mixed"
MODES = ("eager", "compiled")
EDM_V100_IMAGES_PER_S = 145.0  # 200 Mimg / (2 days × 86,400 s × 8 V100), fp32 (Karras et al. 2022)
SYNC_WARNING = "synchronizing cuda operation"  # torch's sync-debug warning, lower-cased


@dataclasses.dataclass(frozen=True)
class Config:
    """What is run: the backbone preset and data shape, the training batch, warm-up / timed / watched
    steps and the time budget of each timed window, the sampling and feature batches, and the
    ``torch.compile`` backend (None: no compiled runs)."""

    backbone: str
    shape: tuple[int, ...]
    batch: int
    warmup: int
    steps: int
    sync_steps: int
    budget_s: float
    sample_batch: int
    sample_repeats: int
    feature_batch: int
    feature_repeats: int
    compile_backend: str | None

    def train_setup(self) -> bench_train.Setup:
        """As a ``bench_train.Setup``: its ``total_steps`` batches cover the warm-up, the timed steps,
        the watched steps and the step whose start closes the last window."""
        return bench_train.Setup(
            self.backbone, self.shape, self.batch, steps=self.steps + self.sync_steps, warmup=self.warmup
        )


GPU = Config(
    "ddpmpp_cifar", (3, 32, 32), batch=128, warmup=5, steps=20, sync_steps=4, budget_s=20.0,
    sample_batch=256, sample_repeats=3, feature_batch=256, feature_repeats=10,
    compile_backend="inductor",
)  # fmt: skip
SMOKE = Config(
    "unet_tiny", (3, 8, 8), batch=4, warmup=1, steps=2, sync_steps=2, budget_s=10.0,
    sample_batch=4, sample_repeats=1, feature_batch=2, feature_repeats=1,
    compile_backend="eager",
)  # fmt: skip


# ---- time and memory ----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Frees what earlier runs left and resets the peak: on CUDA the allocator's counters; on the CPU
    the process's peak RSS (Linux ``clear_refs``; where refused, the peak stays the process's)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` on CUDA, the
    process's peak RSS (``VmHWM``) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Clock:
    """A training run's phases, ticked at the start of each step (its batch already on the device).

    Steps ``[0, warmup)`` warm up (compilation included) and are timed together; the timed window then
    runs from step ``warmup`` until ``steps`` steps ran or ``budget_s`` passed; then ``sync_steps``
    steps are watched under ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only), the sync warnings
    of each counted, apart for steps whose metrics are logged. The device is synchronised at the phase
    boundaries only, outside the watched steps.
    """

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.start = self.timed_from = 0.0
        self.warmup_s = self.timed_s = math.nan
        self.timed_steps = 0
        self.watch_from = -1
        self.syncs: dict[bool, list[int]] = {False: [], True: []}  # logging step? → syncs per step
        self._watch: tuple[warnings.catch_warnings, list[warnings.WarningMessage]] | None = None
        self._logging, self._pending, self._counted = False, False, 0

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def tick(self, step: int, logging: bool = False) -> bool:
        """Called at the start of ``step`` (``logging``: its metrics are logged); False when the run is
        complete (``step`` is then not needed)."""
        cfg = self.cfg
        self._count_step()
        if step == 0:
            self.start = self._now()
        if step == cfg.warmup:
            self.timed_from = self._now()
            self.warmup_s = self.timed_from - self.start
        elif step > cfg.warmup and self.timed_steps == 0:
            full = step == cfg.warmup + cfg.steps
            if full or time.perf_counter() - self.timed_from > cfg.budget_s:
                self.timed_s = self._now() - self.timed_from
                self.timed_steps, self.watch_from = step - cfg.warmup, step
        if self.timed_steps == 0:
            return True
        if step < self.watch_from + cfg.sync_steps:
            if self.device.type == "cuda":
                self._watch_step(logging)
            return True
        self.close()
        return False

    def _watch_step(self, logging: bool) -> None:
        if self._watch is None:
            catcher = warnings.catch_warnings(record=True)
            self._watch = (catcher, catcher.__enter__())
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._logging, self._pending = logging, True

    def _count_step(self) -> None:
        """Files the sync warnings caught since the last count under the step just ended."""
        if self._watch is not None and self._pending:
            n = sum(SYNC_WARNING in str(w.message).lower() for w in self._watch[1])
            self.syncs[self._logging].append(n - self._counted)
            self._counted, self._pending = n, False

    def close(self) -> None:
        """Ends the watch (its last step counted), restoring the sync-debug mode and warning filters."""
        if self._watch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._count_step()
            self._watch[0].__exit__(None, None, None)
            self._watch = None

    @property
    def images_per_s(self) -> float:
        return self.timed_steps * self.cfg.batch / self.timed_s


class ClockCallback(Callback):
    """Ticks the clock at each training step's start; stops the fit when the clock is done. Records the
    first step's loss."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.first_loss = clock, math.nan

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.clock.tick(trainer.global_step, logs_this_step(trainer)):
            trainer.should_stop = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 1:  # after the first optimizer step: in the warm-up, not watched
            self.first_loss = float(outputs["loss"])


class CompileBackbone(Callback):
    """``pl_module.backbone.compile(backend=...)`` at setup, after the callbacks listed before it (the
    EMA copies the uncompiled module): what ``model.compile=true`` does in ``DiffusionModule.setup``,
    with the backend a choice (dynamo's ``eager`` for the CPU smoke run)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.backbone.compile(backend=self.backend)


# ---- the training contenders --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Training:
    """One contender's training run."""

    images_per_s: float
    timed_steps: int
    warmup_s: float
    peak_gib: float
    first_loss: float
    syncs: int | None  # over the watched non-logging steps; None: not checked (no CUDA)
    sync_steps: int  # watched non-logging steps
    logging_syncs: int | None  # over the watched logging steps, if any


def diffusion_module(backbone: nn.Module, comps: Components) -> DiffusionModule:
    """``DiffusionModule`` as ``bench_train`` builds it, with channels_last inputs (the backbone is
    converted beforehand)."""
    return bench_train.diffusion_module(backbone, comps, channels_last=True)


def run_bare(
    backbone: nn.Module,
    comps: Components,
    cfg: Config,
    data: TensorDataset,
    clock: Clock,
    backend: str | None,
) -> float:
    """``bench_train``'s bare loop on the device, under bf16 autocast, channels_last, the backbone
    compiled with ``backend`` (None: eager); returns the first step's loss."""
    objective = Objective(comps.schedule, comps.prediction, comps.weighting, comps.proposal)
    backbone.to(clock.device).train()
    if backend is not None:
        backbone.compile(backend=backend)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=LR)
    net = partial(backbone, labels=None)
    first_loss = math.nan
    for step, (x, _) in enumerate(bench_train.loader(data, cfg.batch)):
        x = x.to(clock.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if not clock.tick(step):
            break
        logsnr, eps = bench_train.training_noise(comps.proposal, x, SEED, step)
        with torch.autocast(clock.device.type, dtype=torch.bfloat16, cache_enabled=False):  # as bf16-mixed
            loss = objective(net, x, logsnr=logsnr, eps=eps).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            first_loss = float(loss.detach())
    return first_loss


def run_lightning(
    backbone: nn.Module,
    comps: Components,
    cfg: Config,
    data: TensorDataset,
    clock: Clock,
    backend: str | None,
    extras: bool,
) -> float:
    """``DiffusionModule`` under a Trainer on the device in ``bf16-mixed``; ``extras``: with what
    ``train.py`` adds (``bench_train.train_py_extras``). Returns the first step's loss."""
    module = diffusion_module(backbone, comps)
    timer = ClockCallback(clock)
    compiling = [] if backend is None else [CompileBackbone(backend)]
    callbacks, steps = [*compiling, timer], cfg.train_setup().total_steps
    with bench_train.bench_trainer(extras, callbacks, steps, clock.device.type, PRECISION) as trainer:
        try:
            trainer.fit(module, train_dataloaders=bench_train.loader(data, cfg.batch))
        finally:  # the clock's warning filters nest inside the ones set here
            clock.close()
    return timer.first_loss


def train_once(
    contender: str,
    template: nn.Module,
    comps: Components,
    cfg: Config,
    data: TensorDataset,
    device: torch.device,
    backend: str | None,
) -> Training:
    """One run of ``contender`` from a channels_last copy of ``template``'s weights."""
    backbone = copy.deepcopy(template).to(memory_format=torch.channels_last)
    clock = Clock(cfg, device)
    reset_peak_memory(device)
    try:
        if contender == BARE:
            first_loss = run_bare(backbone, comps, cfg, data, clock, backend)
        else:
            first_loss = run_lightning(
                backbone, comps, cfg, data, clock, backend, extras=contender == TRAIN_PY
            )
    finally:
        clock.close()
    if clock.timed_steps == 0:
        raise RuntimeError(f"{contender}: the run ended before its timed window closed")
    checked = device.type == "cuda"
    return Training(
        images_per_s=clock.images_per_s,
        timed_steps=clock.timed_steps,
        warmup_s=clock.warmup_s,
        peak_gib=peak_memory_gib(device),
        first_loss=first_loss,
        syncs=sum(clock.syncs[False]) if checked else None,
        sync_steps=len(clock.syncs[False]),
        logging_syncs=sum(clock.syncs[True]) if checked and clock.syncs[True] else None,
    )


# ---- sampling and features ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Throughput:
    """Images/s of a repeated call (after one untimed call, reported as ``first_s``)."""

    images_per_s: float
    repeats: int
    first_s: float
    peak_gib: float
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


def repeat_timed(
    fn: Callable[[], object], images: int, repeats: int, budget_s: float, device: torch.device
) -> Throughput:
    """``fn`` (``images`` images a call) once untimed, then ``repeats`` times or until ``budget_s``."""
    reset_peak_memory(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    begin = time.perf_counter()
    done = 0
    while done < repeats and (done == 0 or time.perf_counter() - begin < budget_s):
        fn()
        done += 1
    synchronize(device)
    end = time.perf_counter()
    return Throughput(done * images / (end - begin), done, begin - start, peak_memory_gib(device))


def bench_sampling(template: nn.Module, comps: Components, cfg: Config, device: torch.device) -> Throughput:
    """The module's sampler (Heun, ``sample_steps`` steps, EDM grid) through its denoiser on a batch of
    noise, under bf16 autocast, channels_last, eval mode."""
    module = diffusion_module(copy.deepcopy(template), comps).to(device).eval()
    module.backbone.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(cfg.sample_batch, *cfg.shape, generator=g).to(device)
    noise = noise.contiguous(memory_format=torch.channels_last)

    def sample() -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return module.generate(noise)

    result = repeat_timed(sample, cfg.sample_batch, cfg.sample_repeats, cfg.budget_s, device)
    result.detail.update(sampler=repr(module.sampler), nfe=module.sampler.nfe)
    return result


def inception_weights(folder: Path) -> tuple[Path, str]:
    """torch.hub's cached Inception weights if present, else a random-init file written in ``folder``."""
    cached = PRETRAINED["inception"].default_path()
    if cached.is_file():
        return cached, "pretrained"
    return save_random_inception_weights(folder / "random-inception.pth", seed=SEED), "random-init"


def bench_features(cfg: Config, device: torch.device) -> Throughput:
    """The FID extractor's pool features of a batch of random uint8 images of the data's shape."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, kind = inception_weights(Path(tmp))
        extractor = build_extractor("fid", weights, device)
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (cfg.feature_batch, *cfg.shape), generator=g, dtype=torch.uint8).to(device)

    def features() -> Tensor:
        with torch.no_grad():
            return extractor(images)

    result = repeat_timed(features, cfg.feature_batch, cfg.feature_repeats, cfg.budget_s, device)
    result.detail.update(weights=kind, feature_dim=extractor.feature_dim)
    return result


# ---- the report ---------------------------------------------------------------------------------
def number(value: float, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits, without an exponent from 10^(digits-1) up."""
    return f"{value:.0f}" if value >= 10 ** (digits - 1) else f"{value:.{digits}g}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({bench_train.machine()})"


def header(cfg: Config, device: torch.device, smoke: bool) -> str:
    """The title and what was measured on."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    what = (
        f"**CPU smoke run** (`--cpu-smoke`: `{cfg.backbone}`, a test of the script, not a measurement)"
        if smoke
        else f"`{cfg.backbone}` (`conf/backbone/{cfg.backbone}.yaml`)"
    )
    shape = "×".join(map(str, cfg.shape))
    return (
        f"# GPU benchmark: training, host syncs, sampling and FID features\n\n"
        f"{now}; {device_name(device)}; torch {torch.__version__}{cuda}, lightning "
        f"{importlib.metadata.version('lightning')}.\n\n"
        f"{what}, data {shape}, batch {cfg.batch}, EDM weighting / preconditioning / log-normal "
        f"proposal, Adam lr {LR}, {PRECISION}, channels_last; `torch.compile` backend "
        f"`{cfg.compile_backend}` (the first compiled contender pays the compilation, the others reuse "
        f"its cache). Training: {cfg.warmup} warm-up step(s) (compilation included), then up "
        f"to {cfg.steps} timed steps or {cfg.budget_s:g} s; host syncs counted over {cfg.sync_steps} "
        f'more steps (`torch.cuda.set_sync_debug_mode("warn")`). Anchor: EDM trained this network at '
        f"about {EDM_V100_IMAGES_PER_S:.0f} images/s per V100 in fp32 (200 Mimg in ~2 days on 8 GPUs).\n"
    )


def cell(result: Any, fmt: Callable[[Any], str]) -> str:
    """``fmt(result)``, ``–`` if not run, ``error`` if it failed."""
    if result is None:
        return "–"
    if isinstance(result, Exception):
        return "error"
    return fmt(result)


def syncs_cell(t: Training) -> str:
    if t.syncs is None:
        return "not checked (no CUDA)"
    logging_part = f"; {t.logging_syncs} on logging steps" if t.logging_syncs is not None else ""
    return f"{t.syncs} ({t.sync_steps} steps{logging_part})"


def table(results: dict[str, Any], cfg: Config, sampler: Sampler) -> str:
    """One Markdown table: a row per figure, a column per mode (eager, compiled); NFE as counted."""
    training = {mode: results.get(mode, {}) for mode in MODES}
    rows: list[tuple[str, dict[str, str]]] = []

    def per_contender(label: str, fmt: Callable[[Training], str]) -> None:
        for contender in CONTENDERS:
            rows.append((label.format(contender), {m: cell(training[m].get(contender), fmt) for m in MODES}))

    def ratio(mode: str, contender: str) -> str:
        ours, bare = training[mode].get(contender), training[mode].get(BARE)
        if ours is None or bare is None:
            return "–"
        if isinstance(ours, Exception) or isinstance(bare, Exception):
            return "error"
        return f"{ours.images_per_s / bare.images_per_s:.3f}"

    per_contender("training images/s: {}", lambda t: number(t.images_per_s))
    for contender in CONTENDERS[1:]:
        rows.append((f"{contender} / bare (images/s)", {m: ratio(m, contender) for m in MODES}))
    rows.append(
        (
            f"{TRAIN_PY} / EDM's {EDM_V100_IMAGES_PER_S:.0f} images/s per V100 (fp32)",
            {
                m: cell(training[m].get(TRAIN_PY), lambda t: f"{t.images_per_s / EDM_V100_IMAGES_PER_S:.2f}")
                for m in MODES
            },
        )
    )
    per_contender("peak memory (GiB): {}", lambda t: f"{t.peak_gib:.2f}")
    per_contender(f"first {cfg.warmup} steps (s, compilation included): {{}}", lambda t: f"{t.warmup_s:.2f}")
    per_contender("host syncs on non-logging steps: {}", syncs_cell)
    sampling, features = results.get("sampling"), results.get("features")
    nfe = f", NFE {sampling.detail['nfe']}" if isinstance(sampling, Throughput) else ""
    rows.append(
        (
            f"{sampler.name} sampling images/s ({sampler.steps} steps, {sampler.grid} grid{nfe}, batch "
            f"{cfg.sample_batch}, bf16)",
            {"eager": cell(sampling, lambda s: number(s.images_per_s)), "compiled": "–"},
        )
    )
    rows.append(
        (
            f"Inception feature images/s (batch {cfg.feature_batch}, float32)",
            {"eager": cell(features, lambda s: number(s.images_per_s)), "compiled": "–"},
        )
    )
    lines = ["| measurement | eager | torch.compile |", "|---|---:|---:|"]
    lines += [f"| {label} | {cells['eager']} | {cells['compiled']} |" for label, cells in rows]
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> str:
    """What the table cannot say: the sampler, the Inception weights, errors."""
    out = []
    if isinstance(sampling := results.get("sampling"), Throughput):
        out.append(
            f"sampler: {sampling.detail['sampler']}, {sampling.detail['nfe']} denoiser calls per batch"
        )
    if isinstance(features := results.get("features"), Throughput):
        out.append(f"Inception weights: {features.detail['weights']}")
    out += [f"{key}: {err}" for key, err in errors(results)]
    return "".join(f"- {line}\n" for line in out)


def errors(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(measurement, ``Type: message``) of every measurement that failed."""
    found = []
    for key, value in results.items():
        values = value.items() if isinstance(value, dict) else [("", value)]
        for name, result in values:
            if isinstance(result, Exception):
                found.append((f"{key} {name}".strip(), f"{type(result).__name__}: {result}"))
    return found


def as_json(results: dict[str, Any], cfg: Config, device: torch.device) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, Exception):
            return {"error": f"{type(value).__name__}: {value}"}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return dataclasses.asdict(value)

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "lightning": importlib.metadata.version("lightning"),
        "config": dataclasses.asdict(cfg),
        "precision": PRECISION,
        "edm_v100_images_per_s": EDM_V100_IMAGES_PER_S,
        "results": plain(results),
    }


def write(out: Path | None, report: str, payload: dict[str, Any]) -> None:
    if out is None:
        return
    replace_atomically(out / "bench_gpu.md", lambda f: f.write(report.encode()))
    replace_atomically(out / "bench_gpu.json", lambda f: f.write(json.dumps(payload, indent=2).encode()))


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="folder for bench_gpu.md and bench_gpu.json")
    parser.add_argument("--steps", type=int, help="timed training steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before them (default 5; smoke 1)")
    parser.add_argument("--sync-steps", type=int, help="steps watched for host syncs (default 4)")
    parser.add_argument("--budget", type=float, help="seconds per timed window (default 20)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny configuration on the CPU: tests the script, measures nothing",
    )
    args = parser.parse_args(argv)
    for flag, value, ok, allowed in (
        ("--steps", args.steps, args.steps is None or args.steps >= 1, ">= 1"),
        ("--warmup", args.warmup, args.warmup is None or args.warmup >= 1, ">= 1 (compilation is not timed)"),
        ("--sync-steps", args.sync_steps, args.sync_steps is None or args.sync_steps >= 0, ">= 0"),
        ("--budget", args.budget, args.budget is None or args.budget > 0, "> 0"),
    ):
        if not ok:
            parser.error(f"{flag}={value}: must be {allowed}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error(
            "no CUDA GPU is available: this benchmark needs one; --cpu-smoke runs its code on the CPU "
            "with a tiny configuration (a test of the script, not a measurement)"
        )
    return args


def configure(args: argparse.Namespace) -> Config:
    """The GPU or smoke configuration with the flags given."""
    given = {
        "steps": args.steps,
        "warmup": args.warmup,
        "sync_steps": args.sync_steps,
        "budget_s": args.budget,
    }
    cfg = dataclasses.replace(
        SMOKE if args.cpu_smoke else GPU, **{k: v for k, v in given.items() if v is not None}
    )
    return dataclasses.replace(cfg, compile_backend=None) if args.no_compile else cfg


def main(argv: Sequence[str] | None = None) -> tuple[str, int]:
    """Runs every measurement, printing the report at the end (written to ``--out`` after each one);
    returns the report and the exit status (1 if a measurement failed)."""
    args = parse_args(argv)
    cfg = configure(args)
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if args.cpu_smoke:  # one thread: on a loaded machine, more stall ops on tiny tensors several-fold
        torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    comps = bench_train.components(WEIGHTING)
    setup = cfg.train_setup()
    template, data = bench_train.build_backbone(setup), bench_train.synthetic_data(setup)
    results: dict[str, Any] = {}
    begin = time.perf_counter()

    def render() -> str:
        report = (
            f"{header(cfg, device, args.cpu_smoke)}\n{table(results, cfg, comps.sampler)}\n{notes(results)}"
        )
        return report + f"\ntotal time: {time.perf_counter() - begin:.0f} s\n"

    def measure(key: str, name: str | None, fn: Callable[[], Any]) -> None:
        what, start = f"{key} {name or ''}".strip(), time.perf_counter()
        print(f"[bench_gpu] {what} …", file=sys.stderr, flush=True)
        try:
            value: Any = fn()
        except Exception as err:  # a failed measurement is reported; the others still run
            traceback.print_exc()
            value = err.with_traceback(None)  # its frames would hold the run's tensors (device memory)
        print(f"[bench_gpu] {what}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if name is None:
            results[key] = value
        else:
            results.setdefault(key, {})[name] = value
        write(args.out, render(), as_json(results, cfg, device))

    plan = [("eager", None)] + ([("compiled", cfg.compile_backend)] if cfg.compile_backend else [])
    for i, (mode, backend) in enumerate(plan):
        for contender in CONTENDERS:
            measure(
                mode, contender, partial(train_once, contender, template, comps, cfg, data, device, backend)
            )
        if i == 0:  # sampling and features before compiling: a run cut short keeps them
            measure("sampling", None, partial(bench_sampling, template, comps, cfg, device))
            measure("features", None, partial(bench_features, cfg, device))
    report = render()
    print(report, flush=True)
    write(args.out, report, as_json(results, cfg, device))
    return report, 1 if errors(results) else 0


if __name__ == "__main__":
    sys.exit(main()[1])
