"""Peak-memory measurement shared by the benchmarks.

On CUDA the allocator keeps exact statistics. On CPU PyTorch keeps none, so we read the
process's resident-memory high-water mark from Linux (``VmHWM`` in ``/proc/self/status``) after
resetting it (``/proc/self/clear_refs``), and tell glibc's ``malloc`` to hand large blocks
straight back to the operating system, so that freed memory is not silently reused and the
high-water mark reflects what the measured code needed; before each measurement, whatever it
still holds unused is released too (``malloc_trim``).

:class:`LiveTensorBytes` counts exactly instead, on any device, but only tensors: the bytes of
every tensor storage an operation creates while it is active, until that storage is freed. It
tells what a step leaves allocated behind it, which the resident size cannot (a step that frees
what the previous one left hides its own growth there).
"""

import ctypes
import gc
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minifusion.host_memory import return_freed_memory_at_once

_configured = False


def configure_malloc() -> None:
    """Make glibc return freed blocks of ≥ 64 KiB to the system (once per process, Linux only:
    :func:`minifusion.host_memory.return_freed_memory_at_once`)."""
    global _configured
    if not _configured:
        return_freed_memory_at_once()
        _configured = True


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _release_free_memory() -> None:
    """Hand memory that ``malloc`` holds but nobody uses back to Linux (``malloc_trim``).

    Otherwise it counts in the resident size at the reset, and when ``fn`` frees something and
    glibc trims then, the resident size falls by it while ``fn`` allocates: the growth is hidden
    (a pass of a few MiB right after bigger work read 0).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current resident size; ``False`` where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra memory (bytes) at the peak of ``fn()`` over what was in use before it.

    ``None`` where it cannot be measured (CPU outside Linux).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    configure_malloc()
    _release_free_memory()
    if not _reset_high_water_mark():
        fn()
        return None
    before = _status_bytes("VmRSS")
    fn()
    peak = max(_status_bytes("VmHWM"), _status_bytes("VmRSS"))
    # The kernel's resident-size counters are updated in batches per thread, so for passes that
    # need well under a MiB the difference can come out slightly negative: report 0 then.
    return max(peak - before, 0)


def format_mib(value: int | None, digits: int = 1) -> str:
    """Bytes as MiB for a table cell; ``n/a`` where the memory could not be measured."""
    return "n/a" if value is None else f"{value / 2**20:.{digits}f}"


def format_ratio(value: int | None, reference: int | None, digits: int = 2) -> str:
    """``value / reference`` for a table cell; ``n/a`` where either is missing or zero."""
    return "n/a" if value is None or not reference else f"{value / reference:.{digits}f}"


class LiveTensorBytes(TorchDispatchMode):
    """Exact bytes of the tensor storages created inside the ``with`` block that are alive.

    Every operation dispatched while the mode is active (forward, backward — autograd runs CPU
    work on the calling thread and carries the mode along — and recomputation) is seen once its
    outputs exist; a new storage (not a view of, or written in place into, one of the inputs) is
    counted until Python's reference to it and every tensor sharing it are gone. ``peak``: the
    largest total at any operation's end; ``live_after``: what is still allocated when the block
    exits (after a garbage collection). Storages older than the block are not counted, and
    neither is scratch memory an operation frees before returning.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.live_after: int | None = None
        self._sizes: dict[int, int] = {}  # data pointer -> bytes, for the storages alive

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}  # fmt: skip
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._sizes:
                continue
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out

    def __exit__(self, *exc_info):
        result = super().__exit__(*exc_info)
        gc.collect()
        self.live_after = self.live
        return result
