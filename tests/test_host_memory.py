"""minifusion.host_memory: a training step's freed blocks come back without faulting their pages
in again.

Each case runs in a fresh interpreter: malloc's settings belong to the whole process, and a
pytest worker's own heap would blur the count. The step is the one the setting is for: an output
head's cross-entropy, forward and backward, over 2,048 tokens and 4,096 logits, whose logits,
softmax and logits' gradient are 32 MiB each. The count is the process's minor page faults
(``getrusage``), and the reasoning is the kernel's: untouched anonymous memory is faulted in
(zero-filled) one 4 KiB page at a time on its first write, so a fresh 32 MiB block costs 8,192
faults. The median over 20 steps, after 10 in which the heap grows to what a step needs (a block
that torch allocates aligned does not fit an exactly-sized freed one, so the heap settles only
once freed stretches have coalesced; a late step may still grow it once).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minifusion.host_memory import reuse_freed_memory

LOGIT_PAGES = 2048 * 4096 * 4 // 4096

MEDIAN_STEP_FAULTS = """
import resource, statistics, sys
import torch
import torch.nn.functional as F
from minifusion.host_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(), "glibc refused the settings"
torch.manual_seed(0)
hidden = torch.randn(2048, 128, requires_grad=True)
weight = (0.02 * torch.randn(4096, 128)).requires_grad_()
targets = torch.randint(4096, (2048,))
def step():
    F.cross_entropy(hidden @ weight.T, targets).backward()
    hidden.grad = weight.grad = None
for _ in range(10):
    step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="malloc's settings are glibc's (Linux)"
)


def median_step_faults(mode: str) -> float:
    """The median minor page faults of one step of the head's loss (see the module's docstring)."""
    done = subprocess.run([sys.executable, "-c", MEDIAN_STEP_FAULTS, mode],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return float(done.stdout.split()[-1])


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: then a fresh block faults once per 2 MiB."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@glibc_only
def test_a_steady_step_faults_in_almost_nothing():
    assert median_step_faults("reuse") < LOGIT_PAGES / 100


@glibc_only
def test_without_it_every_step_faults_its_large_blocks_in_again():
    """The control: glibc's default unmaps each 32 MiB block on free, so the count above is the
    setting's doing, not a machine that never faults."""
    if huge_pages_always():
        pytest.skip("transparent huge pages 'always': one fault per 2 MiB, not per page")
    assert median_step_faults("default") >= LOGIT_PAGES


@glibc_only
def test_calling_it_again_is_harmless():
    code = "from minifusion.host_memory import reuse_freed_memory as r; print(r(), r())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]


def test_no_glibc_means_no_change(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_freed_memory() is False
