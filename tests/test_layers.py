"""The layers of DESIGN.md, read from the imports: arrows only point down.

    core  ←  nn, data, metrics  ←  lightning  ←  helpers (config, checkpoint, …)  ←  entry points

``errors`` and ``paths`` are leaves any layer may use. ``core`` is pure torch. Entry points (the
commands) never import one another, and no helper imports a command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffusionflow

PACKAGE = Path(diffusionflow.__file__).parent
LEAVES = {"errors", "paths"}
MIDDLE = {"nn", "data", "metrics"}
ENTRY_POINTS = {"train", "sample", "evaluate", "compare", "encode"}
LEVEL = {"core": 0, **dict.fromkeys(MIDDLE, 1), "lightning": 2}
HELPER, ENTRY = 3, 4
NOT_IN_CORE = ("lightning", "hydra", "omegaconf", "wandb", "torchvision", "matplotlib")


def _level(part: str) -> int:
    if part in LEVEL:
        return LEVEL[part]
    return ENTRY if part in ENTRY_POINTS else HELPER


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports made absolute)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    mine = path.relative_to(PACKAGE).with_suffix("").parts
    if mine[0] in LEAVES or mine == ("__init__",):
        return
    here = _level(mine[0])
    for name in _imports(path):
        if mine[0] == "core":
            assert name.split(".")[0] not in NOT_IN_CORE, f"core imports {name}: core is pure torch"
        parts = name.split(".")
        if parts[0] != "diffusionflow" or len(parts) < 2 or parts[1] in LEAVES:
            continue
        target = parts[1]
        there = _level(target)
        if here == ENTRY and there == ENTRY:
            assert target == mine[0], f"{path.name}: the command {mine[0]} imports the command {target}"
        elif here == LEVEL["core"] or here in (1, 2):
            assert there <= here, f"{'/'.join(mine)} imports {name}, a layer above it"
        elif here == HELPER:
            assert there != ENTRY, f"{'/'.join(mine)} imports the command {name}"


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for path in MODULES:
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}
