"""``reused_heap``: inside it a freed large tensor's pages are reused (no page faults for the next one of
its size), after it they are returned as glibc would; user allocator settings are left alone. That the
features stay bit for bit torch-fidelity's is checked in ``test_fidelity_parity.py`` (our extractor
runs inside ``reused_heap``, torch-fidelity's outside)."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from diffusionflow.metrics.heap import USER_SETTINGS, glibc_malloc, reused_heap

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

PAGES = 64 * 2**20 // 4096  # a 64 MiB tensor: above glibc's largest mmap threshold (32 MiB)


def faults_of_next_tensor() -> int:
    """Minor page faults taken to allocate and fill a 64 MiB tensor just after freeing one."""
    freed = torch.ones(PAGES * 1024)
    del freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(PAGES * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_pages_reused_inside_and_returned_after() -> None:
    assert glibc_malloc() is not None, "this test runs with glibc's malloc left to us"
    assert faults_of_next_tensor() > PAGES // 2, "glibc's default: a fresh mmap, every page faulted in"
    with reused_heap() as changed:
        assert changed
        faults_of_next_tensor()  # the heap grows to hold one
        assert faults_of_next_tensor() < PAGES // 100
    assert faults_of_next_tensor() > PAGES // 2, "thresholds back below 64 MiB: mmap again"


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_user_allocator_settings_left_alone(name: str) -> None:
    assert glibc_malloc({name: "1"}) is None
    assert glibc_malloc({name: ""}) is not None, "an empty variable sets nothing"
