"""minifusion.host_memory: a freed block comes back without faulting its pages in again.

Each case runs in a fresh interpreter: malloc's settings belong to the whole process, and a
pytest worker's own heap would blur the count. The count is the process's minor page faults
(``getrusage``), and the reasoning is the kernel's: 64 MiB of untouched anonymous memory is
16,384 pages of 4 KiB, each faulted in (zero-filled) on its first write.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minifusion.host_memory import reuse_freed_memory

BLOCK_BYTES = 64 << 20
PAGES = BLOCK_BYTES // 4096

REPEATS = 3

REPEATED_ALLOCATION_FAULTS = f"""
import resource, sys
import torch
from minifusion.host_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(), "glibc refused the settings"
def allocate_fill_free():  # float32: {BLOCK_BYTES:,} bytes, every page written
    block = torch.ones({BLOCK_BYTES // 4})
    del block
for _ in range({REPEATS}):  # the heap grows until a freed stretch holds the block and its
    allocate_fill_free()    # alignment (torch asks posix_memalign, which needs a little more)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({REPEATS}):
    allocate_fill_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="malloc's settings are glibc's (Linux)"
)


def repeated_allocation_faults(mode: str) -> int:
    """Minor page faults of allocating, filling and freeing a 64 MiB tensor three more times,
    as a training step does with its logits."""
    done = subprocess.run([sys.executable, "-c", REPEATED_ALLOCATION_FAULTS, mode],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout.split()[-1])


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: then a fresh block faults once per 2 MiB."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@glibc_only
def test_a_reused_block_is_not_faulted_in_again():
    assert repeated_allocation_faults("reuse") < REPEATS * PAGES // 100


@glibc_only
def test_without_it_the_freed_block_is_unmapped_and_faulted_in_again():
    """The control: glibc's default unmaps a 64 MiB block on free, so the count above is the
    setting's doing, not a machine that never faults."""
    if huge_pages_always():
        pytest.skip("transparent huge pages 'always': one fault per 2 MiB, not per page")
    assert repeated_allocation_faults("default") >= REPEATS * PAGES // 2


@glibc_only
def test_calling_it_again_is_harmless():
    code = "from minifusion.host_memory import reuse_freed_memory as r; print(r(), r())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]


def test_no_glibc_means_no_change(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_freed_memory() is False
