"""Chapter 00 — the small helpers every other chapter leans on.

* :func:`seed_everything` makes a run repeatable (same data order, same initial weights).
* :func:`pick_device` chooses the best accelerator that is actually present.
* :func:`environment_report` says what this machine has, so a reader can tell at a glance
  whether the fast GPU paths (CUDA, mamba-ssm kernels) will be used or the pure-PyTorch ones.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import os
import platform
import random
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EnvironmentReport",
    "environment_report",
    "format_count",
    "fsync_dir",
    "lock_report",
    "locked_versions",
    "pick_device",
    "seed_everything",
    "within",
    "WIDGET_NOTE",
    "show_widget",
    "source_code",
]


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, skipping the call when ``x`` already has that dtype.

    Same result either way; the skipped call is a dispatched no-op that costs a few
    microseconds, which adds up in a decode step of a small model (hundreds of such calls).
    """
    return x if x.dtype == dtype else x.to(dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every random number generator a training run touches.

    Python's ``random``, NumPy, and PyTorch (CPU and every CUDA device) are seeded with the
    same ``seed``. With ``deterministic=True`` PyTorch is also asked to use only deterministic
    kernels — slower on GPU, but two runs then agree bit for bit; an operation that has no
    deterministic implementation raises instead of silently varying.

    Args:
        seed: any non-negative integer; the value itself does not matter, only that it is fixed.
        deterministic: also force deterministic algorithms (cuDNN, cuBLAS, scatter/index ops).
            ``False`` (the default) switches that strict mode off again if it was on.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy accepts only 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device
    # Hash randomisation only affects processes started after this point (workers, subprocesses).
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless without CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to disk, so a file created or renamed in it survives a power cut.

    ``fsync`` on a file makes its *contents* durable; the name that points to it lives in the
    folder, which needs its own ``fsync`` (POSIX; a no-op where folders cannot be opened).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """``fsync`` every file below ``path``, then every folder, deepest first.

    For folders whose files were written by code that does not flush them itself (DeepSpeed's
    checkpoint shards, its universal-checkpoint converter) before they are renamed into place.
    """
    for entry in sorted(Path(path).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if entry.is_file():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        elif entry.is_dir():
            fsync_dir(entry)
    fsync_dir(path)


def silence_library_progress_bars() -> None:
    """Switch off transformers' own progress bars ("Loading weights …") for this process: what
    a command's ``--no-progress`` promises covers the libraries it calls too."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the best available device: CUDA, then Apple's MPS, then the CPU.

    Args:
        prefer: force a device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); an unavailable
            choice raises ``RuntimeError`` rather than silently falling back.
    """
    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"Device {prefer!r} was requested but CUDA is not available on this machine; "
                "use 'cpu' or leave the device unset to pick automatically."
            )
        if (
            device.type == "cuda"
            and device.index is not None
            and device.index >= torch.cuda.device_count()
        ):
            raise RuntimeError(
                f"Device {prefer!r} was requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), numbered from 0; use one of those."
            )
        if device.type == "mps" and not _mps_available():
            raise RuntimeError(
                f"Device {prefer!r} was requested but Apple MPS is not available; "
                "use 'cpu' or leave the device unset to pick automatically."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mamba_kernels_importable() -> tuple[bool, str]:
    """Whether mamba-ssm's fused selective-scan CUDA kernel can be imported, and why not."""
    try:
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as exc:  # ImportError, or an OSError from a CUDA library
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return True, "ok"


@dataclass
class EnvironmentReport:
    """What this machine offers MiniFusion. ``str(report)`` prints an aligned table."""

    python: str
    platform: str
    packages: dict[str, str | None]
    cuda_available: bool
    cuda_version: str | None
    gpus: list[str] = field(default_factory=list)
    mps_available: bool = False
    mamba_kernels: bool = False
    mamba_kernels_detail: str = ""
    cpu_scan_kernel: str = ""  # our compiled scan (minifusion.extensions.scan_kernel_status)
    cpu_threads: int = 1
    device: str = "cpu"

    def rows(self) -> list[tuple[str, str]]:
        rows = [("python", self.python), ("platform", self.platform)]
        rows += [(name, version or "not installed") for name, version in self.packages.items()]
        rows.append(("torch threads", str(self.cpu_threads)))
        cuda = f"yes (CUDA {self.cuda_version})" if self.cuda_available else "no"
        rows.append(("CUDA", cuda))
        for i, gpu in enumerate(self.gpus):
            rows.append((f"  GPU {i}", gpu))
        rows.append(("Apple MPS", "yes" if self.mps_available else "no"))
        without = "no: GPU Mamba layers use the chunked PyTorch scan"
        kernels = "yes" if self.mamba_kernels else without
        rows.append(("mamba-ssm kernels", kernels))
        rows.append(("CPU scan kernel", self.cpu_scan_kernel))
        rows.append(("chosen device", self.device))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def environment_report() -> EnvironmentReport:
    """Collect versions, accelerators and optional kernels (see :class:`EnvironmentReport`)."""
    packages = {
        name: _package_version(name)
        for name in ("torch", "transformers", "datasets", "tokenizers", "deepspeed", "mamba-ssm")
    }
    gpus: list[str] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(f"{props.name}, {props.total_memory / 2**30:.0f} GiB")
    kernels_ok, detail = _mamba_kernels_importable()
    from .extensions import scan_kernel_status  # imports torch.utils.cpp_extension: only here

    return EnvironmentReport(
        python=sys.version.split()[0],
        platform=f"{platform.system()} {platform.machine()}",
        packages=packages,
        cuda_available=torch.cuda.is_available(),
        cuda_version=torch.version.cuda,
        gpus=gpus,
        mps_available=_mps_available(),
        mamba_kernels=kernels_ok,
        mamba_kernels_detail=detail,
        cpu_scan_kernel=scan_kernel_status(),
        cpu_threads=torch.get_num_threads(),
        device=str(pick_device()),
    )


# ----------------------------------------------------------------------------------------------
# The locked versions (requirements/lock.txt, written by `make lock`)
# ----------------------------------------------------------------------------------------------
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
#: The libraries whose versions matter most to the course's results.
KEY_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "safetensors", "deepspeed",
                "numpy", "huggingface-hub", "matplotlib", "jupyterlab")  # fmt: skip


def locked_versions(lock_file: str | os.PathLike = LOCK_FILE) -> dict[str, str]:
    """``{package: version}`` from a pip-compile lock file (``name==version`` lines)."""
    versions = {}
    for line in Path(lock_file).read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            versions[name.strip().lower()] = version.strip()
    return versions


def _public(version: str | None) -> str | None:
    """``2.13.0+cpu`` → ``2.13.0``: a build label (CPU or CUDA wheel) is not another release."""
    return version.split("+")[0] if version else version


def lock_report(packages: Sequence[str] = KEY_PACKAGES, lock_file=LOCK_FILE) -> str:
    """A table of the locked and installed versions of ``packages``, one line each.

    Notebook outputs, CI and ``make train`` are made with the locked versions; a line marked
    ``differs`` means numbers printed here may differ in their last digits from the text.
    """
    if not Path(lock_file).is_file():
        return f"no lock file at {lock_file} (minifusion is installed outside its repository)"
    locked = locked_versions(lock_file)
    rows = [("package", "locked", "installed", "")]
    for name in packages:
        want, have = locked.get(name), _package_version(name)
        mark = "✓" if want and _public(have) == want else "differs"
        rows.append((name, want or "-", have or "not installed", mark))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows
    )


def within(value: float | torch.Tensor, bound: float) -> str:
    """Check ``value ≤ bound`` and return ``"≤ 1e-06"`` (the bound) for printing.

    A rounding error — the largest difference between two float computations of the same
    thing — is as small as it should be on every CPU, but its digits depend on which SIMD
    kernels PyTorch picked (AVX-512, AVX2, plain C++): the order of the sums changes. So the
    chapters print the bound they assert rather than digits that would differ on your machine.
    """
    value = float(value)
    if not value <= bound:
        raise AssertionError(f"{value:.3g} exceeds the bound {bound:.0e}")
    return f"≤ {bound:.0e}"


def source_code(obj, *, docstring: bool = True, excerpt: tuple[str, str] | None = None) -> str:
    """``inspect.getsource(obj)`` without the code formatter's ``# fmt: skip`` markers.

    The markers keep ruff from rewrapping a hand-aligned line; they mean nothing to a reader,
    so the chapters that print the package's code print it through this.

    ``docstring=False`` also drops the function's or class's docstring (where the prose around
    the printout already explains it). ``excerpt=(first, last)`` keeps only the lines from the
    first one containing ``first`` through the next one containing ``last``, between two
    ``…`` lines; a ``ValueError`` names the text that was not found.
    """
    markers = re.compile(r"[ \t]+# fmt: (?:skip|off|on)$", flags=re.MULTILINE)
    source = markers.sub("", inspect.getsource(obj))
    lines = source.splitlines(keepends=True)
    if not docstring:
        # The docstring is the first statement of the definition's body; ast knows its exact
        # lines whatever its quotes. Dedenting keeps line numbers (methods are indented).
        tree = ast.parse(textwrap.dedent(source))
        node = tree if inspect.ismodule(obj) else tree.body[0]
        head_line = getattr(node, "lineno", 0)  # the ``def``/``class`` line (0: a module)
        # (a docstring on the ``def`` line itself stays: dropping its line would drop the def)
        if ast.get_docstring(node) is not None and node.body[0].lineno > head_line:
            start, stop = node.body[0].lineno - 1, node.body[0].end_lineno
            while stop < len(lines) and not lines[stop].strip():
                stop += 1  # and the blank lines that set it apart from the code
            del lines[start:stop]
    if excerpt is not None:
        first, last = excerpt
        start = _line_containing(lines, first, 0, obj)
        stop = _line_containing(lines, last, start, obj)
        indent = re.match(r"[ \t]*", lines[start]).group()
        lines = [f"{indent}…\n", *lines[start : stop + 1], f"{indent}…\n"]
    return "".join(lines)


def _line_containing(lines: list[str], text: str, start: int, obj) -> int:
    """Index of the first of ``lines[start:]`` that contains ``text``."""
    for index in range(start, len(lines)):
        if text in lines[index]:
            return index
    name = getattr(obj, "__qualname__", repr(obj))
    raise ValueError(f"no line of {name}'s source contains {text!r}; check the excerpt's text.")


def format_count(n: float) -> str:
    """Human-readable count: 1234 -> '1.23K', 1.5e9 -> '1.50B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


# Shown where a widget cannot be: an untrusted notebook (JupyterLab restores saved widgets only
# in trusted ones), GitHub's viewer, nbconvert's HTML. Better than the widget's repr.
WIDGET_NOTE = (
    "[interactive figure: run this cell to bring up its controls — saved widgets show only in "
    "a trusted notebook with a running kernel]"
)


def show_widget(widget) -> None:
    """Display an ipywidgets ``widget`` whose text fallback is :data:`WIDGET_NOTE`.

    A live JupyterLab renders the widget as usual. Where it cannot, the cell shows that one line
    instead of ipywidgets' ``VBox(children=(FloatLogSlider(...``.
    """
    from IPython.display import display

    bundle = widget._repr_mimebundle_()
    if "application/vnd.jupyter.widget-view+json" not in (bundle or {}):
        raise TypeError(f"{type(widget).__name__} has no view to display; pass a control or box.")
    display({**bundle, "text/plain": WIDGET_NOTE}, raw=True)
