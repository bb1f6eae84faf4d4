"""Hand freed heap memory back to the operating system between a stage's heavy steps.

glibc's malloc raises its mmap threshold each time a large block it mapped is freed, so later large
numpy and torch buffers come from its heaps, and freed ones stay there: over many shards of exact-ODE
solves the resident set ratchets up with the number of shards, not with what is alive. malloc_trim(0)
returns the free pages. Elsewhere (macOS, musl) there is no such function to call, and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc); a no-op where that is not possible."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
