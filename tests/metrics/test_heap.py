"""``reused_heap``: inside it a freed large tensor's pages are reused (no page faults for the next one of
its size), after it they are returned as glibc would; user allocator settings are left alone. That the
features stay bit for bit torch-fidelity's is checked in ``test_fidelity_parity.py`` (our extractor
runs inside ``reused_heap``, torch-fidelity's outside)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from diffusionflow.metrics.heap import USER_SETTINGS, glibc_malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

PAGES = 64 * 2**20 // 4096  # a 64 MiB tensor: above glibc's largest mmap threshold (32 MiB)
PROBE = f"""
import json, resource, torch
from diffusionflow.metrics.heap import reused_heap

def faults_of_next_tensor():
    freed = torch.ones({PAGES * 1024})
    del freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones({PAGES * 1024})
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults = {{"before": faults_of_next_tensor()}}
with reused_heap() as changed:
    faults_of_next_tensor()  # the heap grows to hold one
    faults["inside"] = faults_of_next_tensor()
faults["after"] = faults_of_next_tensor()
print(json.dumps({{"changed": changed, **faults}}))
"""


def test_freed_pages_reused_inside_and_returned_after() -> None:
    """Minor page faults taken to allocate and fill a 64 MiB tensor just after freeing one, in a fresh
    interpreter (a long-lived one may hold a free 64 MiB block in its heap already, which glibc serves
    whatever the thresholds)."""
    assert glibc_malloc() is not None, "this test runs with glibc's malloc left to us"
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
    faults = json.loads(out.strip().splitlines()[-1])
    assert faults["changed"]
    assert faults["before"] > PAGES // 2, "glibc's default: a fresh mmap, every page faulted in"
    assert faults["inside"] < PAGES // 100, "the freed block reused"
    assert faults["after"] > PAGES // 2, "thresholds back below 64 MiB and the heap trimmed: mmap again"


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_user_allocator_settings_left_alone(name: str) -> None:
    assert glibc_malloc({name: "1"}) is None
    assert glibc_malloc({name: ""}) is not None, "an empty variable sets nothing"
