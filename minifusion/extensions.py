"""Compiled extensions: building them once, finding them again, and never hanging on a dead build.

Two extensions are compiled just in time with ``torch.utils.cpp_extension`` and cached under
``$TORCH_EXTENSIONS_DIR`` (``make`` points it into ``.venv``):

* **our fused selective scan** (``minifusion/csrc/selective_scan.cpp``, chapter 09) — C++ with
  OpenMP, built the first time a CPU Mamba layer runs (about 15 s), then loaded from
  the cache. Without a C++ compiler the scan falls back to the chunked PyTorch scan, with one
  warning that says how to get the fast one;
* **DeepSpeed's CPU communication op** (chapter 14), built by DeepSpeed's own op builder.

``make extensions`` (and so ``make test``) builds both up front, so no test or notebook pays
for a build inside its time limit or prints a compiler's messages.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "STALE_BUILD_LOCK_SECONDS",
    "StaleBuildLockError",
    "build_extensions",
    "check_build_locks",
    "environment_build_tools",
    "extension_build_root",
    "scan_kernel",
    "scan_kernel_status",
]

SCAN_SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan.cpp"  # hub: embedded source
# A saved model's copy of this file builds under another name (hub.py), so the two builds, from
# two source paths, never replace each other in the cache.
SCAN_EXTENSION = "minifusion_selective_scan"  # hub: embedded source
# Set to 0 to run without the compiled scan (the chunked PyTorch scan takes its place).
DISABLE_VARIABLE = "MINIFUSION_FUSED_SCAN"

# Building DeepSpeed's shared-memory extension takes about two minutes on two CPU cores; a
# build lock this much older than that was left by a process that died while holding it.
STALE_BUILD_LOCK_SECONDS = 15 * 60


class StaleBuildLockError(RuntimeError):
    """A compiled-extension build lock outlived the process that took it."""


def extension_build_root() -> Path:
    """Where PyTorch builds (and caches) compiled extensions: ``$TORCH_EXTENSIONS_DIR``, whose
    folders are ``<extension>/``, or else ``~/.cache/torch_extensions``, whose folders are
    ``<python and device tag>/<extension>/``."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def check_build_locks(root: str | Path | None = None, now: float | None = None) -> None:
    """Refuse to start when an extension build lock under ``root`` is stale.

    Every process that loads a just-in-time extension (DeepSpeed's CPU communication op, for
    one) first creates ``<root>/<extension>/lock`` and deletes it when done, *even when the
    extension is already built*. A process killed in that window leaves the file behind, and
    every later start then waits for it forever, printing nothing. Failing here, with the file
    named, turns that silent hang into a one-line fix.
    """
    root = extension_build_root() if root is None else Path(root)
    now = time.time() if now is None else now
    if not root.is_dir():
        return
    # one level below root with $TORCH_EXTENSIONS_DIR, two below the default root
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        with contextlib.suppress(FileNotFoundError):  # released while we looked: not stale
            age = now - lock.stat().st_mtime
            if age > STALE_BUILD_LOCK_SECONDS:
                raise StaleBuildLockError(
                    f"{lock} has been held for {age / 60:.0f} minutes; an extension build "
                    "takes about 2. A process that was loading the extension was killed "
                    "and left it behind, so this start would wait on it forever. If no other "
                    f"training run is starting now, delete it (rm {lock}) and start again."
                )


@contextlib.contextmanager
def environment_build_tools():
    """Put this interpreter's ``bin`` folder first on ``PATH`` while extensions are built or
    loaded — ours here, DeepSpeed's when it loads its own (``distributed.init_distributed``).

    The build tool is ``ninja`` from ``PATH``. The environment installs its own (``make`` puts
    ``.venv/bin`` first), a system may have another version, and the two keep incompatible build
    logs (ninja 1.13 hashes commands differently from 1.11): a process started by ``make`` and
    one started as ``.venv/bin/python …`` or ``.venv/bin/torchrun …`` from a plain shell would
    then each rebuild the extension the other built (15 s for our scan, about 30 s for
    DeepSpeed's op, every time). Always using the environment's own tools makes them agree.
    """
    tools = str(Path(sys.executable).parent)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = tools + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _compiler_flags() -> list[str]:
    """-O3 and OpenMP; no floating-point traps, so branches of exp/log/softplus can be computed
    for every lane and selected (vectorised) without changing any result; unrolled loops (the
    vector loops over a block's channels run a few iterations each, and unrolling them took
    about 7 % off a forward + backward scan, with the same bits out); on x86-64 also the build
    machine's own vector instructions (AVX2, AVX-512), where the cached build is used.

    ``-march=native`` reads the same on every machine, so a build cached on one CPU would load
    on another that lacks its instructions (a shared home folder on a cluster, a copied
    environment) and stop the process with an illegal instruction. The CPU's feature list is
    therefore part of the flags (:func:`cpu_features_tag`): PyTorch rebuilds when the flags
    change, so each kind of CPU runs a build made for it."""
    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-funroll-loops"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=native", f"-DMINIFUSION_BUILD_CPU={cpu_features_tag()}"]
    return flags


def cpu_features_tag(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """12 hex digits naming this CPU's instruction-set features (Linux: the ``flags`` line of
    ``cpuinfo``; elsewhere the processor's name): equal on CPUs that can run the same build."""
    try:
        lines = Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines()
        features = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        features = platform.processor() or platform.machine()
    return hashlib.sha256(" ".join(sorted(features.split())).encode()).hexdigest()[:12]


def _switched_off() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1") == "0"


@functools.cache
def scan_kernel() -> ModuleType | None:
    """The compiled fused scan (built on first use), or ``None`` where it cannot be built.

    ``None`` comes with one warning naming the reason and the fix; the caller then uses the
    chunked PyTorch scan, which gives the same results more slowly.
    """
    if _switched_off():
        return None
    check_build_locks()
    from torch.utils.cpp_extension import load

    try:
        with environment_build_tools():
            return load(
                name=SCAN_EXTENSION,
                sources=[str(SCAN_SOURCE)],
                extra_cflags=_compiler_flags(),
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except (OSError, RuntimeError, ImportError) as error:  # no compiler, no OpenMP, no ninja
        reason = _first_error_line(str(error)) or type(error).__name__
        warnings.warn(
            f"The fused CPU selective scan could not be built ({reason}). Mamba layers fall back "
            "to the chunked PyTorch scan: same results, several times slower. To get the fast "
            "one, install a C++ compiler with OpenMP (Debian/Ubuntu: apt install g++; macOS: "
            "brew install libomp llvm) and run `make extensions`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def scan_kernel_status() -> str:
    """Where our compiled CPU scan stands, in one line, *without* building it (a build takes
    about 15 s; the environment report that shows this line should not)."""
    if _switched_off():
        return f"off ({DISABLE_VARIABLE}=0): CPU Mamba layers use the chunked PyTorch scan"
    root = extension_build_root()
    # $TORCH_EXTENSIONS_DIR/<extension>/ or ~/.cache/torch_extensions/<python tag>/<extension>/
    for pattern in (f"{SCAN_EXTENSION}/*", f"*/{SCAN_EXTENSION}/*"):
        if any(path.name.startswith(SCAN_EXTENSION) and path.suffix in (".so", ".pyd")
               for path in root.glob(pattern)):  # fmt: skip
            return "built: CPU Mamba layers use it"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}): CPU Mamba layers use the chunked PyTorch scan"
    return "not built yet: compiled when a CPU Mamba layer first runs (or by `make extensions`)"


def _first_error_line(message: str) -> str:
    """The compiler's first ``error:`` line of a failed build, else the message's last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line or "not found" in line]
    return (errors or lines or [""])[0 if errors else -1]


def build_extensions() -> None:
    """Build (or find already built) every compiled extension this machine uses.

    The fused scan on every machine; DeepSpeed's CPU communication op where there is no CUDA
    (NCCL needs none). Doing this once before several runs start side by side, as ``make unit``
    does, keeps the first builds out of every run's time limit.
    """
    scan_kernel()
    if torch.cuda.is_available():
        return
    check_build_locks()
    try:  # a dependency of the package; absent where a saved model's copy of this file runs
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        with environment_build_tools():
            builder.load(verbose=False)
