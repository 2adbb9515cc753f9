"""Fault drill: inject the faults of a two-week cluster run into tiny training runs and check what survives.

    python scripts/fault_drill.py [--out logs/drill] [--seed 0] [--jobs 2]

Every run trains the default 2-D job for ``STEPS`` optimizer steps (a checkpoint every ``EVERY`` steps,
epochs of ``STEPS_PER_EPOCH`` steps, so kills land mid-epoch and across an epoch boundary) in its own
folder with ``resume=auto``. A reference run goes uninterrupted. Each fault is then injected at a
random step (``--seed``) and the drill checks, per fault: the exit code (a signal, a NaN or a kill is
never a silent success), that every checkpoint left behind loads with ``weights_only=True`` and holds
finite weights, that rerunning the same command resumes and ends with final weights (raw and EMA)
*equal* to the reference run's, and how many optimizer steps the fault cost (the step reached minus
the step resumed from). Faults on inputs (garbage checkpoints and caches, a hostile pickle, a URL, a
second run in a folder) must be refused or repaired before any work, and no file from outside the
run is ever read as code. Prints a table (Markdown) and writes it with the details to
``<out>/drill.json``; exits 1 if any case did not survive.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
STEPS, EVERY, STEPS_PER_EPOCH = 48, 8, 32
TINY = [
    f"trainer.max_steps={STEPS}",
    f"data.train_dataset.n={STEPS_PER_EPOCH * 64}",
    "data.batch_size=64",
    "sampler.steps=4",
    "callbacks.final_eval.num_samples=256",
    f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "extras.print_config=false",
    "resume=auto",
    "+callbacks.drill_clock._target_=drill_clock.StepClock",
]
SLEEP = "+callbacks.drill_clock.sleep_s=0.15"  # steps slow enough for a signal to land where aimed


@dataclass
class Case:
    """One injected fault and what came of it."""

    fault: str
    at: str = ""
    exit_code: str = ""
    survived: bool = False
    steps_lost: int | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    note: str = ""

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        self.survived = all(self.checks.values())
        return bool(ok)


# ---- running training ------------------------------------------------------------------------------
def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["WANDB_MODE"] = "offline"
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **(extra or {})}


def start(
    run_dir: Path, overrides: Sequence[str] = (), env: dict[str, str] | None = None, sweep: bool = False
) -> subprocess.Popen:
    """``python -m diffusionflow.train`` in ``run_dir`` (``sweep``: a ``-m`` multirun with its jobs in
    ``run_dir/<num>``), output appended to ``run_dir/drill_stdout.log``."""
    where = ["-m", f"hydra.sweep.dir={run_dir}"] if sweep else [f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "diffusionflow.train", *where, *TINY, *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "drill_stdout.log").open("a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    return proc.wait(timeout=timeout)


def train(run_dir: Path, overrides: Sequence[str] = (), env: dict[str, str] | None = None) -> int:
    return finish(start(run_dir, overrides, env))


def reached(run_dir: Path) -> int:
    """The last optimizer step the run reported (``drill_clock.StepClock``), 0 before the first."""
    path = run_dir / "drill_steps.txt"
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-1]) if lines else 0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if reached(run_dir) >= step:
            return True
        time.sleep(0.02)
    return False


def log_text(run_dir: Path) -> str:
    path = run_dir / "drill_stdout.log"
    return path.read_text(errors="replace") if path.exists() else ""


# ---- what survived -------------------------------------------------------------------------------
def load(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def checkpoints_sound(run_dir: Path) -> bool:
    """Every ``.ckpt`` in the run loads with ``weights_only=True`` and all its weights are finite."""
    for path in [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]:
        ckpt = load(path)
        if ckpt is None:
            return False
        for key in ("state_dict", "current_model_state"):
            for value in ckpt.get(key, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                    return False
    return True


def newest_step(run_dir: Path) -> int:
    """The global step of the newest loadable checkpoint of the run (0 without one)."""
    steps = [
        int(ckpt["global_step"])
        for path in [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
        if (ckpt := load(path)) is not None
    ]
    return max(steps, default=0)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor] | None:
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    if ckpt is None or int(ckpt["global_step"]) != STEPS:
        return None
    return {f"raw.{k}": v for k, v in ckpt["current_model_state"].items()} | {
        f"ema.{k}": v for k, v in ckpt["state_dict"].items()
    }


def equal(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    return (
        a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    )


# ---- the faults --------------------------------------------------------------------------------------
def send(case: Case, proc: subprocess.Popen, sig: signal.Signals) -> None:
    """``sig`` to the run's process group (its DataLoader workers too, as a cluster's kill would)."""
    try:
        os.killpg(proc.pid, sig)
        case.check("alive when signalled", True)
    except ProcessLookupError:
        case.check("alive when signalled", False)


def partial_writes(run_dir: Path) -> list[Path]:
    """Temporary files of checkpoint writes in progress (or of writes a kill cut short)."""
    return [*run_dir.glob("checkpoints/.*.tmp"), *run_dir.glob(".*.tmp")]


def wait_for_write(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if partial_writes(run_dir):
            return True
        time.sleep(0.002)
    return False


def signal_case(
    name: str,
    sig: signal.Signals,
    expected: int,
    out: Path,
    ref: dict,
    step: int,
    env: dict[str, str] | None = None,
    mid_write: bool = False,
    before: Callable[[subprocess.Popen], None] | None = None,
    after: Callable[[Case, Path], None] | None = None,
) -> Case:
    """A signal at ``step`` (``mid_write``: while the checkpoint of that step is being written, made slow
    by 256 MB of ballast); then the same command again, which resumes."""
    run_dir = out / name
    case = Case(name, at=f"step {step}" + (", writing the checkpoint" if mid_write else ""))
    proc = start(run_dir, [SLEEP, *(["+callbacks.drill_clock.ballast_mb=256"] if mid_write else [])], env)
    case.check("reached the step", wait_for_step(proc, run_dir, step))
    if mid_write:
        case.check("caught a write half-done", wait_for_write(proc, run_dir))
    hit = reached(run_dir)
    if before is not None:
        before(proc)
    send(case, proc, sig)
    rc = finish(proc)
    case.exit_code = str(rc)
    case.check(f"exit {expected}", rc == expected)
    case.check("checkpoints load, finite", checkpoints_sound(run_dir))
    if sig != signal.SIGKILL:
        case.check("interrupted marker", (run_dir / "interrupted").exists())
    resumed_from = newest_step(run_dir)
    case.steps_lost = max(hit - resumed_from, 0)
    if after is not None:
        after(case, run_dir)
    case.check("resumed run exits 0", train(run_dir) == 0)
    case.check("final weights = uninterrupted", equal(final_weights(run_dir), ref))
    case.check("marker cleared", not (run_dir / "interrupted").exists())
    case.check("no partial write left", not partial_writes(run_dir))
    return case


def slurm_case(out: Path, ref: dict, step: int) -> Case:
    """SLURM's time-limit signal (USR1, as the launcher asks for it), a fake ``scontrol`` that records
    the requeue, then SLURM's SIGTERM; the requeued job (same folder) continues."""
    bin_dir = out / "fake_slurm_bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    record = out / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "drill",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }

    def usr1(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def requeued(case: Case, run_dir: Path) -> None:
        calls = record.read_text().split("\n") if record.exists() else []
        case.check("scontrol requeue 4242", "requeue 4242" in calls)

    return signal_case("slurm_requeue", signal.SIGTERM, 143, out, ref, step, env, before=usr1, after=requeued)


def sweep_case(out: Path, ref: dict, step: int) -> Case:
    """SIGTERM in job 0 of a three-job sweep (basic launcher; the jobs differ in the sampler only, so each
    trains the reference weights): the sweep exits 143 and names the two jobs it did not run; the same
    command again resumes job 0 and runs the other two."""
    sweep_dir = out / "sweep"
    case = Case("sigterm in a 3-job sweep", at=f"job 0, step {step}")
    overrides = [SLEEP, "sampler.steps=4,5,6"]
    proc = start(sweep_dir, overrides, sweep=True)
    case.check("reached the step", wait_for_step(proc, sweep_dir / "0", step))
    hit = reached(sweep_dir / "0")
    send(case, proc, signal.SIGTERM)
    rc = finish(proc)
    case.exit_code = str(rc)
    case.check("exit 143", rc == 143)
    info_path = sweep_dir / "sweep_interrupted.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    case.check("names jobs 1, 2 as not run", [j["num"] for j in info.get("not_run", [])] == [1, 2])
    case.check("checkpoints load, finite", checkpoints_sound(sweep_dir / "0"))
    case.steps_lost = max(hit - newest_step(sweep_dir / "0"), 0)
    case.check("rerun exits 0", finish(start(sweep_dir, overrides, sweep=True)) == 0)
    case.check(
        "every job's final weights = uninterrupted",
        all(equal(final_weights(sweep_dir / str(n)), ref) for n in range(3)),
    )
    case.check("sweep marker cleared", not info_path.exists())
    return case


def nan_case(out: Path, step: int) -> Case:
    run_dir = out / "nan"
    case = Case("nan_loss", at=f"step {step}")
    rc = train(
        run_dir, ["+callbacks.drill_nan._target_=drill_clock.NaNAtStep", f"+callbacks.drill_nan.step={step}"]
    )
    case.exit_code = str(rc)
    case.check("exit non-zero", rc != 0)
    case.check(
        "message names the step", f"step {step}" in log_text(run_dir) or f"step={step}" in log_text(run_dir)
    )
    case.check("checkpoints load, finite", checkpoints_sound(run_dir))
    case.check("no metrics.json", not (run_dir / "metrics.json").exists())
    good = newest_step(run_dir)
    case.check("a good checkpoint kept", 0 < good < step)
    case.steps_lost = step - good
    return case


def truncated_case(out: Path, ref: dict) -> Case:
    """A copy of a half-trained run whose newest checkpoint was cut in half: resume=auto must skip it."""
    run_dir = out / "truncated_ckpt"
    case = Case("truncated newest checkpoint", at="resume")
    stop = EVERY * 3
    case.check("partial run exits 0", train(run_dir, [f"trainer.max_steps={stop}"]) == 0)
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    case.steps_lost = stop - newest_step(run_dir)
    rc = train(run_dir)
    case.exit_code = str(rc)
    case.check("resumed run exits 0", rc == 0)
    case.check("warning names the file", "last.ckpt" in log_text(run_dir))
    case.check("final weights = uninterrupted", equal(final_weights(run_dir), ref))
    return case


def refused_case(name: str, out: Path, overrides: Sequence[str], must_say: str) -> Case:
    run_dir = out / name
    case = Case(name, at="start")
    rc = train(run_dir, overrides)
    case.exit_code = str(rc)
    text = log_text(run_dir)
    case.check("exit non-zero", rc != 0)
    case.check(f"says {must_say!r}", must_say in text)
    case.check("no weights_only=False advice", "weights_only=False" not in text)
    case.check("nothing trained", not (run_dir / "checkpoints").exists())
    return case


def garbage_ckpt_case(out: Path) -> Case:
    path = out / "garbage.ckpt"
    out.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
    return refused_case("garbage ckpt_path", out, [f"ckpt_path={path}", "resume=null"], "not a checkpoint")


def hostile_ckpt_case(out: Path) -> Case:
    """A pickle that would create a file when unpickled: refused, and the file never appears."""
    marker = out / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[Callable, tuple]:
            return (Path.touch, (marker,))

    path = out / "hostile.ckpt"
    out.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    case = refused_case(
        "hostile pickle as ckpt_path", out, [f"ckpt_path={path}", "resume=null"], "not a checkpoint"
    )
    case.check("payload never ran", not marker.exists())
    return case


def two_runs_case(out: Path) -> Case:
    run_dir = out / "two_runs"
    case = Case("second run in a folder in use", at="while the first trains")
    # The first run waits while `hold` exists: it is still training when the second one starts, however
    # long that start takes on a loaded machine.
    hold = out / "two_runs.hold"
    out.mkdir(parents=True, exist_ok=True)
    hold.touch()
    first = start(run_dir, [f"+callbacks.drill_clock.hold={hold}"])
    case.check("first run started", wait_for_step(first, run_dir, 1))
    try:
        rc = train(run_dir)
    finally:
        hold.unlink()
    case.exit_code = str(rc)
    case.check("second refused", rc != 0 and "run.lock" in log_text(run_dir))
    first_rc = finish(first)
    case.check("first run exits 0", first_rc == 0)
    return case


def cache_case(out: Path) -> Case:
    """A garbage digits-classifier cache is rebuilt, to the same weights as a fresh build."""
    from diffusionflow.metrics.digits_classifier import DigitsClassifier

    case = Case("garbage digits-classifier cache", at="load")
    fresh = DigitsClassifier(cache_dir=out / "cache_fresh")
    files = sorted((out / "cache_fresh").glob("*.pt"))
    broken = out / "cache_broken"
    broken.mkdir(parents=True, exist_ok=True)
    for f in files:
        (broken / f.name).write_bytes(os.urandom(512))
    rebuilt = DigitsClassifier(cache_dir=broken)
    same = all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), rebuilt.state_dict().values(), strict=True)
    )
    case.exit_code = "-"
    case.check("rebuilt, same weights", same and bool(files))
    return case


def hostile_cifar_case(out: Path) -> Case:
    from diffusionflow.data.cifar10 import CIFAR10

    marker = out / "PWNED_CIFAR"

    class Payload:
        def __reduce__(self) -> tuple[Callable, tuple]:
            return (Path.touch, (marker,))

    folder = out / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]:
        (folder / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))
    case = Case("hostile CIFAR-10 batch", at="load")
    try:
        CIFAR10(root=str(out / "cifar"))
        refused = False
    except Exception as err:
        refused = "data_batch" in str(err) or "cifar" in str(err).lower()
    case.exit_code = "-"
    case.check("refused, names the file", refused)
    case.check("payload never ran", not marker.exists())
    return case


# ---- the drill -------------------------------------------------------------------------------------
def drill(out: Path, seed: int, jobs: int = 2) -> list[Case]:
    """The reference run, then every case, ``jobs`` at a time (each in its own folder; a signal lands at
    a step, not a time, so running cases side by side moves no fault)."""
    rng = random.Random(seed)
    if out.exists():
        shutil.rmtree(out)
    ref_dir = out / "reference"
    rc = train(ref_dir)
    if rc != 0:
        raise SystemExit(f"the reference run failed (exit {rc}); see {ref_dir / 'drill_stdout.log'}")
    ref = final_weights(ref_dir)

    def any_step() -> int:
        return rng.randrange(2, STEPS - 2)

    def ckpt_step() -> int:
        return EVERY * rng.randrange(1, STEPS // EVERY)

    url = "http://example.com/x.ckpt"
    term, intr, kill = signal.SIGTERM, signal.SIGINT, signal.SIGKILL
    cases: list[Callable[[], Case]] = [
        partial(signal_case, "sigterm", term, 143, out, ref, any_step()),
        partial(signal_case, "sigint", intr, 130, out, ref, any_step()),
        partial(signal_case, "sigkill", kill, -kill, out, ref, any_step()),
        partial(signal_case, "sigkill mid-checkpoint", kill, -kill, out, ref, ckpt_step(), mid_write=True),
        partial(signal_case, "sigterm mid-checkpoint", term, 143, out, ref, ckpt_step(), mid_write=True),
        partial(slurm_case, out, ref, any_step()),
        partial(sweep_case, out, ref, any_step()),
        partial(nan_case, out, rng.randrange(EVERY + 1, STEPS)),
        partial(truncated_case, out, ref),
        partial(garbage_ckpt_case, out),
        partial(hostile_ckpt_case, out),
        partial(refused_case, "ckpt_path is a URL", out, [f"ckpt_path={url}", "resume=null"], "URL"),
        partial(two_runs_case, out),
        partial(cache_case, out),
        partial(hostile_cifar_case, out),
    ]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda case: case(), cases))


def table(cases: Sequence[Case]) -> str:
    lines = [
        "| fault | injected at | exit | survived | steps lost | failed checks |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        failed = ", ".join(k for k, ok in c.checks.items() if not ok) or "—"
        lost = "—" if c.steps_lost is None else str(c.steps_lost)
        lines.append(
            f"| {c.fault} | {c.at} | {c.exit_code} | {'yes' if c.survived else 'NO'} | {lost} | {failed} |"
        )
    survived = sum(c.survived for c in cases)
    lines.append(f"\n{len(cases)} faults injected, {survived} survived.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("logs/drill"))
    parser.add_argument("--seed", type=int, default=0, help="chooses the steps where faults land")
    parser.add_argument("--jobs", type=int, default=2, help="cases run side by side (each a 1-thread run)")
    args = parser.parse_args(argv)
    start_time = time.monotonic()
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: must be >= 1")
    cases = drill(args.out.resolve(), args.seed, args.jobs)
    text = table(cases)
    print(text)
    print(f"({time.monotonic() - start_time:.0f} s)")
    (args.out / "drill.json").write_text(json.dumps([asdict(c) for c in cases], indent=2))
    return 0 if all(c.survived for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
