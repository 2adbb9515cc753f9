"""The installed package, not the source tree: a wheel built from a copy of the project, installed
non-editably into a fresh virtual environment, its console scripts run from an empty folder; and the
declared dependencies are the imported ones.

The fresh environment gets the dependencies from this one's site-packages through a ``.pth`` line
(no network, no second copy of torch). A ``.pth`` line only adds the folder to ``sys.path``: the
``.pth`` files in it (the editable install's ``/…/src`` line among them) are not read, so
``diffusionflow`` can only come from the wheel; the test checks that it does.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("df-train", "df-sample", "df-evaluate", "df-compare", "df-encode")
# A user's own config folder, added with Hydra's search path: an experiment that makes the run quick.
QUICK = """\
# @package _global_
tags: [user-config]
trainer:
  max_steps: 20
  enable_progress_bar: false
  enable_model_summary: false
sampler:
  steps: 4
callbacks:
  final_eval:
    num_samples: 256
"""
PROBE = """\
import importlib.metadata as md, importlib.resources as res, json, diffusionflow
eps = {ep.name: ep for ep in md.entry_points(group="console_scripts") if ep.name.startswith("df-")}
for ep in eps.values():
    ep.load()
print(json.dumps({
    "module": diffusionflow.__file__,
    "conf": str(res.files("diffusionflow.conf") / "train.yaml"),
    "dist": str(md.distribution("diffusionflow").locate_file("")),
    "scripts": sorted(eps),
}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# Declared, used by a shipped config rather than an import: logger=tensorboard (Lightning's logger).
CONFIG_ONLY = {"tensorboard"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_declared_dependencies_are_those_imported():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the optional `latent` extra (the VAE) is imported lazily, inside functions, but imported all the same
    declared = _names(project["dependencies"] + project["optional-dependencies"]["latent"])
    modules = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"diffusionflow", "__future__"}
    dists = packages_distributions()
    assert third_party <= set(dists), f"not installed: {third_party - set(dists)}"
    imported = _names([d for m in third_party for d in dists[m]])
    assert imported - declared == set(), "imported by src/ but not declared in pyproject.toml"
    assert declared - imported - CONFIG_ONLY == set(), "declared in pyproject.toml but never imported"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with ``diffusionflow`` installed from a freshly built wheel; returns its ``bin``."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "project"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)]
    _run([*pip, *build], tmp, dict(os.environ))
    (wheel,) = wheels.glob("diffusionflow-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, dict(os.environ))
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, _env())
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(site.stdout.strip()) / "_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # pip comes from the deps folder; --ignore-installed: never touch the editable install found there
    install = ["install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    _run([str(python), "-m", "pip", "--disable-pip-version-check", *install], tmp, _env())
    return venv / "bin"


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFUSIONFLOW_ROOT", "VIRTUAL_ENV")
    }
    return env | {"WANDB_MODE": "offline", "PYTHONNOUSERSITE": "1"}


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_console_scripts(installed):
    venv = installed.parent.resolve()
    probe = json.loads(_run([str(installed / "python"), "-c", PROBE], installed, _env()).stdout)
    for key in ("module", "conf", "dist"):
        assert Path(probe[key]).resolve().is_relative_to(venv), (key, probe[key])
    assert Path(probe["conf"]).is_file()
    assert probe["scripts"] == sorted(SCRIPTS)
    assert all((installed / s).is_file() for s in SCRIPTS)


@pytest.mark.slow
def test_console_scripts_run_from_an_empty_folder(installed, tmp_path):
    """df-train with a user config folder on Hydra's search path, then df-compare on its run: everything
    under the current folder, nothing under the repository's logs/ (df-sample: ~10 s more, left out)."""
    user_conf = tmp_path / "myconf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "quick.yaml").write_text(QUICK)
    work = tmp_path / "work"
    work.mkdir()
    before = set(ROOT.glob("logs/**/.hydra/hydra.yaml"))
    env = _env()

    _run(
        [str(installed / "df-train"), f"hydra.searchpath=[{user_conf.as_uri()}]", "experiment=quick"],
        work,
        env,
    )
    (run,) = (work / "logs" / "train" / "runs").iterdir()
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "weighting.png").is_file()  # diffusionflow.plots
    assert "user-config" in (run / ".hydra" / "config.yaml").read_text()

    out = _run([str(installed / "df-compare"), str(run), "--out", str(work / "cmp")], work, env)
    assert (work / "cmp" / "comparison.md").is_file() and "final/" in out.stdout

    for path in set(ROOT.glob("logs/**/.hydra/hydra.yaml")) - before:  # other sessions may write there
        assert str(work) not in path.read_text(), f"{path}: a run of this test under the repository"
