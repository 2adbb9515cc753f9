"""Large CPU tensors reused from the heap during a feature extractor's forward (glibc only).

glibc's malloc serves every block above ``M_MMAP_THRESHOLD`` (at most 32 MiB, however it adapts) with
its own ``mmap`` and returns it with ``munmap`` when freed. An Inception forward on 64 images at
299 × 299 allocates and frees tens of activations of 20–200 MB, so each one costs fresh pages that the
kernel must fault in and zero: about a sixth of the forward's time on CPU (``scripts/bench_fid.py``).
Inside :func:`reused_heap` the thresholds are raised so those blocks come from the heap and are reused
by the next layer; the kernels, hence the features, are the same bit for bit. The price is a higher
peak: blocks freed in one order are not always reusable in the next, so the heap holds more at once
(Inception, batch 64: peak RSS 2.8 GB against 1.6 GB; torch-fidelity's whole path peaks at 2.5 GB).
On leaving, the
thresholds are set to 32 MiB / 64 MiB (the values glibc's own adaptation reaches once a process has
freed a 32 MiB block, as any torch process soon has) and ``malloc_trim`` hands the freed memory back,
so the process keeps no more memory than before.

Nothing is changed where the allocator is not glibc's, or where the user has chosen its settings
(``MALLOC_*_`` or ``GLIBC_TUNABLES`` variables, or a preloaded allocator such as jemalloc/tcmalloc).
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
HELD = 2**31 - 1  # the largest value mallopt's int takes: every block from the heap, none trimmed
AFTER = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
USER_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def glibc_malloc(environ: Mapping[str, str] = os.environ) -> ctypes.CDLL | None:
    """The process's C library if its malloc is glibc's and left to us, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(environ.get(name) for name in USER_SETTINGS):
        return None
    return _libc()


@cache
def _libc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def reused_heap() -> Iterator[bool]:
    """Freed large blocks stay in the heap for reuse until the block ends (see the module docstring);
    yields whether the allocator's settings were changed."""
    libc = glibc_malloc()
    if libc is None:
        yield False
        return
    for option in AFTER:
        libc.mallopt(option, HELD)
    try:
        yield True
    finally:
        for option, value in AFTER.items():
            libc.mallopt(option, value)
        libc.malloc_trim(0)
