"""scripts/fault_drill.py end to end (issue 10): every injected fault survived, with the checks each
kind of fault must pass. About five minutes on two cores; CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault_drill.py"


@pytest.mark.slow
def test_every_fault_of_the_drill_is_survived(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "drill")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    cases = {c["fault"]: c for c in json.loads((tmp_path / "drill" / "drill.json").read_text())}
    checks = {name: c["checks"] for name, c in cases.items()}
    failed = {name: [k for k, ok in c.items() if not ok] for name, c in checks.items() if not all(c.values())}
    rows = [line for line in proc.stdout.splitlines() if "| NO |" in line]
    assert proc.returncode == 0 and not failed, f"{failed}\n{rows}\n{proc.stderr[-2000:]}"
    assert len(cases) >= 15
    for name, case in cases.items():
        assert case["checks"], name  # a case with no check would pass on a stub
        if name.startswith(("sig", "slurm")):
            assert case["exit_code"] != "0", name
            assert any("final weights = uninterrupted" in check for check in case["checks"]), name
    assert f"{len(cases)} faults injected, {len(cases)} survived." in proc.stdout
