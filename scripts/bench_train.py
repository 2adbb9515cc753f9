"""Training speed: ``DiffusionModule`` under ``lightning.Trainer`` against a bare PyTorch loop.

    python scripts/bench_train.py [--backbone unet_tiny mlp] [--steps N] [--warmup N] [--rounds R]
                                  [--threads T] [--quick] [--out DIR]

Contenders, each training the same backbone from the same initial weights on the same batches:

* ``bare``: a plain loop: Adam, and the core ``Objective`` with λ and ε drawn exactly as
  ``DiffusionModule`` draws them (generators seeded by ``step_seed(seed, 0, step, 0 | 1)`` each step),
  so both contenders follow the same loss trajectory (checked by the tests).
* ``lightning``: ``DiffusionModule`` under a Trainer set up for a fair measurement (CPU, 32-bit, no
  logger, checkpointing, progress bar, model summary, EMA or sanity check). What the module does
  on every step beyond the loss (``self.log`` calls, the gradient norm, the per-λ-bin loss sums) is
  counted as Lightning's cost: the bare loop does none of it.
* ``lightning + train.py extras``: the same with what ``train.py``'s default config adds per step:
  the callbacks that act on every step (``conf/callbacks/``: the EMA, the finite guard and the
  throughput log), a CSV logger and ``log_every_n_steps`` from ``conf/trainer/default.yaml``.

The weighting is ``flow`` (train.py's default) with its canonical schedule, prediction and proposal,
lr 1e-3, unconditional. Data are random tensors in memory, fed to both contenders through the same
kind of ``DataLoader`` (no workers) that yields each batch with one indexing operation (a batch sampler
over a ``TensorDataset``), so data loading adds little to either. Steps ``warmup .. warmup + steps``
are timed (``time.perf_counter()`` at the start of each, after its batch is fetched: Lightning's
``on_train_batch_start``); a round runs every contender once, in alternating order, and the table
gives the median over rounds of each contender's mean time per step. Writes ``bench_train.md`` to
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import itertools
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from diffusionflow.core.components import Components, component
from diffusionflow.core.objective import Objective
from diffusionflow.core.proposals import Proposal
from diffusionflow.lightning.module import DiffusionModule, step_seed
from diffusionflow.paths import CONFIG_DIR

BARE, LIGHTNING, TRAIN_PY = "bare", "lightning", "lightning + train.py extras"
CONTENDERS = (BARE, LIGHTNING, TRAIN_PY)
WEIGHTING = "flow"
LR = 1e-3
SEED = 0


@dataclasses.dataclass(frozen=True)
class Setup:
    """A benchmark case: backbone preset, data shape, batch size, timed and warm-up steps."""

    backbone: str
    shape: tuple[int, ...]
    batch: int
    steps: int
    warmup: int

    @property
    def total_steps(self) -> int:
        """Steps run: warm-up, the timed ones, and one more whose start closes the last interval."""
        return self.warmup + self.steps + 1


SETUPS = {
    "unet_tiny": Setup("unet_tiny", (3, 32, 32), 64, steps=30, warmup=3),
    "mlp": Setup("mlp", (2,), 512, steps=150, warmup=10),
}
QUICK_SETUPS = {
    "unet_tiny": Setup("unet_tiny", (3, 8, 8), 4, steps=3, warmup=1),
    "mlp": Setup("mlp", (2,), 64, steps=8, warmup=2),
}


@dataclasses.dataclass
class Run:
    """One contender's run: ``perf_counter`` at the start of each timed step, and the first losses."""

    times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def ms_per_step(self) -> float:
        """Mean time per timed step (ms)."""
        return 1e3 * (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    @property
    def step_ms(self) -> list[float]:
        """The duration of each timed step (ms)."""
        return [1e3 * (b - a) for a, b in itertools.pairwise(self.times)]


@dataclasses.dataclass(frozen=True)
class Row:
    """A contender's mean ms/step in each round, and the duration of every timed step of all rounds."""

    contender: str
    ms: tuple[float, ...]
    step_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        """The headline: median over rounds of the mean time per step (includes periodic work)."""
        return statistics.median(self.ms)

    @property
    def typical_ms(self) -> float:
        """Median single step over all rounds: robust to bursts of load from other processes, blind to
        work done every n steps (logging)."""
        return statistics.median(self.step_ms)


# ---- the common ingredients ---------------------------------------------------------------------
def components(weighting: str = WEIGHTING) -> Components:
    """The weighting with its canonical schedule, prediction and proposal (as ``train.py`` resolves
    ``schedule/prediction/proposal=canonical``); the sampler is only needed to build the module."""
    run = {"weighting": component("weighting", weighting)}
    for kind in ("schedule", "prediction", "proposal"):
        run[kind] = component(kind, "canonical", run)
    run["sampler"] = component("sampler", "heun", run, steps=18, grid="edm")
    return Components(**run)


def build_backbone(setup: Setup, seed: int = SEED) -> nn.Module:
    """``conf/backbone/<name>.yaml`` (``unet_tiny``: the UNet ``tiny`` preset; ``mlp``: train.py's
    default MLP) for unconditional data of the setup's shape, with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    cfg = OmegaConf.load(CONFIG_DIR / "backbone" / f"{setup.backbone}.yaml")
    return instantiate(cfg, shape=list(setup.shape), num_classes=0)


def synthetic_data(setup: Setup, seed: int = SEED) -> TensorDataset:
    """Random N(0, I) data for every step of a run, with (unused) zero labels."""
    g = torch.Generator().manual_seed(seed)
    n = setup.total_steps * setup.batch
    return TensorDataset(torch.randn(n, *setup.shape, generator=g), torch.zeros(n, dtype=torch.long))


def loader(data: TensorDataset, batch: int) -> DataLoader:
    """Batches in order, each by one indexing operation (no per-item collation), no workers."""
    return DataLoader(
        data, batch_size=None, sampler=BatchSampler(SequentialSampler(data), batch, drop_last=True)
    )


def training_noise(proposal: Proposal, x: Tensor, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """λ and ε as ``DiffusionModule`` draws them at ``step`` on rank 0: λ from a CPU generator seeded
    by stream 0, then ε from a generator on x's device seeded by stream 1."""
    cpu = torch.Generator().manual_seed(step_seed(seed, 0, step, 0))
    dev = torch.Generator(device=x.device).manual_seed(step_seed(seed, 0, step, 1))
    logsnr = proposal.sample(x.shape[0], cpu, device=x.device).to(x.dtype)
    eps = torch.randn(x.shape, generator=dev, device=x.device, dtype=x.dtype)
    return logsnr, eps


# ---- the contenders -----------------------------------------------------------------------------
def run_bare(
    backbone: nn.Module,
    comps: Components,
    setup: Setup,
    data: TensorDataset,
    record: int = 0,
    seed: int = SEED,
) -> Run:
    """The plain loop; ``record``: keep the loss of the first ``record`` steps; ``seed``: of the noise."""
    objective = Objective(comps.schedule, comps.prediction, comps.weighting, comps.proposal)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=LR)
    net = partial(backbone, labels=None)
    backbone.train()
    run = Run()
    for step, (x, _) in enumerate(loader(data, setup.batch)):
        if step >= setup.warmup:
            run.times.append(time.perf_counter())
            if step == setup.total_steps - 1:
                break
        logsnr, eps = training_noise(comps.proposal, x, seed, step)
        loss = objective(net, x, logsnr=logsnr, eps=eps).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step < record:
            run.losses.append(float(loss.detach()))
    return run


class StepClock(Callback):
    """Records ``perf_counter`` at the start of steps ``warmup .. warmup + steps`` into ``run.times``,
    and the loss of the first ``record`` steps into ``run.losses``."""

    def __init__(self, setup: Setup, run: Run, record: int = 0) -> None:
        self.first, self.last = setup.warmup, setup.warmup + setup.steps
        self.run, self.record = run, record

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first <= trainer.global_step <= self.last:
            self.run.times.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if len(self.run.losses) < self.record:
            self.run.losses.append(float(outputs["loss"]))


PER_STEP_CALLBACKS = ("ema", "finite_guard", "throughput")
"""The default callbacks (``conf/callbacks/default.yaml``) with work on every step; the others act at
epoch ends (checkpoints), the end of training (final evaluation) or on a signal (interrupt)."""


def train_py_extras(save_dir: str) -> dict[str, Any]:
    """Trainer arguments ``train.py``'s default config adds per step: the ``PER_STEP_CALLBACKS``, a CSV
    logger and its ``log_every_n_steps`` (read from ``conf/``; checkpoints are only saved at epoch ends)."""
    folder = CONFIG_DIR / "callbacks"
    callbacks = [instantiate(OmegaConf.load(folder / f"{name}.yaml")[name]) for name in PER_STEP_CALLBACKS]
    trainer_cfg = OmegaConf.load(CONFIG_DIR / "trainer" / "default.yaml")
    return {
        "callbacks": callbacks,
        "logger": CSVLogger(save_dir, name="csv", version=""),
        "log_every_n_steps": int(trainer_cfg.log_every_n_steps),
    }


def diffusion_module(
    backbone: nn.Module, comps: Components, seed: int = SEED, **options: Any
) -> DiffusionModule:
    """``DiffusionModule`` with the bench's components, Adam at ``LR``, and ``options``."""
    return DiffusionModule(
        backbone=backbone,
        schedule=comps.schedule,
        prediction=comps.prediction,
        weighting=comps.weighting,
        proposal=comps.proposal,
        sampler=comps.sampler,
        optimizer=partial(torch.optim.Adam, lr=LR),
        seed=seed,
        **options,
    )


@contextmanager
def bench_trainer(
    extras: bool,
    callbacks: list[Callback],
    max_steps: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> Iterator[Trainer]:
    """A Trainer set up for a fair measurement (no checkpointing, progress bar, model summary or sanity
    check), writing to a temporary folder; ``extras``: with what ``train.py`` adds (:func:`train_py_extras`),
    whose callbacks come before ``callbacks``; without: no logger."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)  # "does not have many workers"
        warnings.filterwarnings("ignore", message=".*LeafSpec")  # lightning 2.6's pytree on torch 2.14
        options = train_py_extras(tmp) if extras else {"callbacks": [], "logger": False}
        yield Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            max_steps=max_steps,
            max_epochs=-1,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
            **{**options, "callbacks": [*options["callbacks"], *callbacks]},
        )


def run_lightning(
    backbone: nn.Module,
    comps: Components,
    setup: Setup,
    data: TensorDataset,
    record: int = 0,
    extras: bool = False,
    seed: int = SEED,
) -> Run:
    """``DiffusionModule`` under a Trainer; ``extras``: with what ``train.py`` adds (see above)."""
    module = diffusion_module(backbone, comps, seed=seed)
    run = Run()
    with bench_trainer(extras, [StepClock(setup, run, record)], setup.total_steps) as trainer:
        trainer.fit(module, train_dataloaders=loader(data, setup.batch))
    return run


# ---- the benchmark ------------------------------------------------------------------------------
def run_contender(
    contender: str,
    template: nn.Module,
    comps: Components,
    setup: Setup,
    data: TensorDataset,
    record: int = 0,
    seed: int = SEED,
) -> Run:
    """One run of ``contender`` from a copy of ``template``'s weights."""
    backbone = copy.deepcopy(template)
    if contender == BARE:
        return run_bare(backbone, comps, setup, data, record, seed)
    return run_lightning(backbone, comps, setup, data, record, extras=contender == TRAIN_PY, seed=seed)


def bench(setup: Setup, rounds: int) -> list[Row]:
    """``rounds`` rounds of every contender (order reversed every other round); a row per contender."""
    comps, template, data = components(), build_backbone(setup), synthetic_data(setup)
    runs: dict[str, list[Run]] = {c: [] for c in CONTENDERS}
    for r in range(rounds):
        for contender in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
            runs[contender].append(run_contender(contender, template, comps, setup, data))
    return [
        Row(c, tuple(run.ms_per_step for run in runs[c]), tuple(v for run in runs[c] for v in run.step_ms))
        for c in CONTENDERS
    ]


def machine() -> str:
    """Processor, CPU model (from /proc/cpuinfo where there is one) and CPU count."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    name = platform.processor() or platform.machine()
    return f"{name}{f' ({model})' if model else ''}, {os.cpu_count()} CPUs"


def load_average() -> str:
    """The 1/5/15-minute load averages (other processes' load makes timings noisy), where known."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def header(threads: int, rounds: int) -> str:
    """What the numbers were measured on, and what they mean."""
    lightning_version = importlib.metadata.version("lightning")
    return (
        f"# Training speed: DiffusionModule under Lightning vs a bare PyTorch loop\n\n"
        f"machine: {machine()}; torch {torch.__version__}, lightning {lightning_version}; "
        f"threads: {threads}; weighting {WEIGHTING} (canonical schedule / prediction / proposal), "
        f"Adam lr {LR}, float32, CPU; data through a DataLoader (no workers, one indexing operation "
        f"per batch); {rounds} rounds, contenders in alternating order; load average at the start "
        f"{load_average()}.\n\n"
        f"ms/step: median over rounds of the mean time per step (what a run takes); typical step: median "
        f"of all single steps (robust to load from other processes, blind to work done every n steps); "
        f"overheads relative to bare.\n"
    )


def table(setup: Setup, rows: Sequence[Row]) -> str:
    """A Markdown table for one setup: a row per contender, ratio and overhead relative to ``bare``."""
    shape = "×".join(map(str, setup.shape))
    bare = next(row for row in rows if row.contender == BARE)
    lines = [
        f"## {setup.backbone}: data {shape}, batch {setup.batch}, {setup.steps} timed steps after "
        f"{setup.warmup} warm-up\n",
        "| contender | ms/step | steps/s | ratio to bare | overhead | typical step (ms) | overhead "
        "(typical) | ms/step per round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = row.median_ms / bare.median_ms
        typical = row.typical_ms / bare.typical_ms
        rounds = ", ".join(f"{v:.2f}" for v in row.ms)
        lines.append(
            f"| {row.contender} | {row.median_ms:.2f} | {1e3 / row.median_ms:.1f} | {ratio:.3f} | "
            f"{100 * (ratio - 1):+.1f}% | {row.typical_ms:.2f} | {100 * (typical - 1):+.1f}% | {rounds} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", nargs="+", choices=sorted(SETUPS), default=["unet_tiny", "mlp"])
    parser.add_argument("--steps", type=int, help="timed steps per run (default: per backbone)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default: per backbone)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, help="folder for bench_train.md")
    args = parser.parse_args(argv)
    for key in ("steps", "rounds", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark, prints the Markdown report (and writes it to ``--out``); returns it."""
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    report = header(args.threads, args.rounds)
    print(report, flush=True)
    for name in args.backbone:
        setup = (QUICK_SETUPS if args.quick else SETUPS)[name]
        overrides = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None}
        setup = dataclasses.replace(setup, **overrides)
        rows = bench(setup, args.rounds)
        section = table(setup, rows)
        print(section, flush=True)
        report += "\n" + section
    footer = f"load average at the end: {load_average()}\n"
    print(footer, flush=True)
    report += "\n" + footer
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_train.md").write_text(report)
    return report


if __name__ == "__main__":
    main()
