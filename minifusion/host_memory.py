"""Reuse freed host memory: glibc's malloc keeps what a CPU training step frees.

A training step allocates the same large tensors every step: at the race's shape (16 × 128
tokens, a vocabulary of 4,096) the logits and their gradient are 32 MiB each. glibc serves a
block that large with a fresh ``mmap`` and unmaps it on ``free``, so the next step's copy
starts as untouched pages, and the kernel zero-fills each 4 KiB page on its first touch: one
page fault per page, 8,192 for each such tensor, every step. That was about half of the output
head's time on two cores.

:func:`reuse_freed_memory` asks malloc to take every block from its heap (``M_MMAP_MAX`` 0)
and to keep the heap's free top instead of giving it back (``M_TRIM_THRESHOLD`` 1 GiB), so a
step reuses pages an earlier step touched. It takes a few steps to settle: torch allocates its
blocks aligned, which an exactly-sized freed block cannot hold, so the heap grows until freed
stretches have coalesced (about ten steps of the head's loss, measured in
``tests/test_host_memory.py``). The price: the process keeps its high-water mark of memory until
it exits, which a training loop reaches every step anyway. It is a per-process
setting; ``bench.memory`` sets the opposite in its own process, to see every allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["TRIM_THRESHOLD", "return_freed_memory_at_once", "reuse_freed_memory"]

# mallopt's parameter numbers in glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before any is returned


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply ``{parameter: value}`` with glibc's ``mallopt``; ``True`` when every one took,
    ``False`` where there is no glibc (macOS, Windows; musl's ``mallopt`` is a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    results = [mallopt(parameter, value) == 1 for parameter, value in settings.items()]
    return all(results)  # mallopt returns 1 on success


def reuse_freed_memory() -> bool:
    """Make this process's ``malloc`` reuse freed blocks instead of unmapping them.

    Returns ``True`` when glibc took both settings; ``False`` where there is no glibc: nothing
    changes there, the program runs as before. Calling it again is harmless.
    """
    # both must hold, or large blocks still come and go
    return _mallopt({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: TRIM_THRESHOLD})


def return_freed_memory_at_once() -> bool:
    """The opposite, for measuring memory: blocks of 64 KiB and more are mapped on their own and
    unmapped on ``free``, and the heap's free top goes back above 64 KiB, so the resident size
    shows what the measured code needed, not what an earlier step left for reuse."""
    return _mallopt({_M_MMAP_THRESHOLD: 1 << 16, _M_TRIM_THRESHOLD: 1 << 16})
