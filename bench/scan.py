"""Selective-scan cost vs sequence length: sequential loop, chunked scan, transformers' reference.

For each length it times one forward + backward pass of each scan on the same inputs (median of
at least three runs after a warm-up; fast scans run until they add up to a second) and measures
the peak extra memory of one pass, then prints a table
with every scan's ratios to the sequential loop:

* ``sequential`` — :func:`minifusion.mamba.selective_scan_sequential`, one position at a time;
* ``chunked`` — :func:`minifusion.mamba.selective_scan_chunked` (pure PyTorch, chunk-parallel);
* ``fused`` — :func:`minifusion.fused_scan.selective_scan_fused`, the compiled C++ kernel (the
  default on CPU), where it builds;
* ``transformers`` — the pure-PyTorch ``mamba_selective_scan`` of transformers' Mamba model
  (a loop over positions over precomputed ``exp(ΔA)`` and ``ΔBu`` tensors);
* ``cuda`` — mamba-ssm's kernel, only on a CUDA device with mamba-ssm installed.

Inputs are laid out as the Mamba mixer hands them over: ``u``, ``delta``, ``z`` are
``(batch, d_inner, L)`` views of ``(batch, L, d_inner)`` tensors (and ``B``, ``C`` of
``(batch, L, N)``), so each scan pays for the layout changes it makes in a model.

:func:`scan_table`, :func:`scan_reading` and :func:`scan_detail` render its section of
``bench/RESULTS.md`` from the data :mod:`bench.report` stores (one column group per
device), :func:`_headline_scan` its row of the README's headline table.

    python -m bench.scan                                    # CPU defaults
    python -m bench.scan --seq-lens 256 2048 --device cuda
"""

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minifusion.fused_scan import fused_scan_available
from minifusion.mamba import (
    mamba_ssm_available,
    selective_scan_chunked,
    selective_scan_cuda,
    selective_scan_fused,
    selective_scan_sequential,
)

from .arguments import non_negative_float, non_negative_int, output_file, positive_int
from .memory import format_mib, format_ratio, peak_memory_bytes
from .tables import MISSING, Data, PerDevice, _ratio, _sorted_union, grouped_table
from .timing import median_seconds

DEFAULT_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)
# Loops over positions cost seconds per pass at long lengths: time them once there.
LONG_LOOP = 4096
# Fast scans are timed until their runs add up to this many seconds (see median_seconds).
MIN_TIMED_SECONDS = 1.0
# transformers' loop indexes full tensors per position, so its backward pass fills a full-size
# zero gradient at every step: O(L²) work (about 75 s at L = 1024 on two CPU cores). It is timed
# once per length, and only up to this length by default.
REFERENCE_MAX_LEN = 512


@dataclass
class Measurement:
    scan: str
    seq_len: int
    seconds: float  # median forward+backward time
    peak_bytes: int | None


def transformers_scan() -> Callable:
    """transformers' pure-PyTorch selective scan (same interface as mamba-ssm's)."""
    from transformers.models.mamba import modeling_mamba

    return modeling_mamba.mamba_selective_scan


def available_scans(device: torch.device) -> dict[str, Callable]:
    scans = {
        "sequential": selective_scan_sequential,
        "chunked": selective_scan_chunked,
        "transformers": transformers_scan(),
    }
    if device.type == "cpu" and fused_scan_available():
        scans["fused"] = selective_scan_fused
    if device.type == "cuda" and mamba_ssm_available():
        scans["cuda"] = selective_scan_cuda
    return scans


def scan_inputs(
    batch_size: int, d_inner: int, d_state: int, seq_len: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """``u, delta, A, B, C, D, z, delta_bias`` (in that order), scaled as in a new Mamba layer."""
    generator = torch.Generator().manual_seed(0)

    def randn(batch: int, channels: int, length: int) -> torch.Tensor:
        """``(batch, channels, length)``, stored as ``(batch, length, channels)``: the mixer's
        layout (its projections produce position-major tensors that the scans see transposed)."""
        rows = torch.randn(batch, length, channels, generator=generator).to(device)
        return rows.transpose(1, 2).detach().requires_grad_()

    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    return {
        "u": randn(batch_size, d_inner, seq_len),
        "delta": randn(batch_size, d_inner, seq_len),
        "A": A.to(device).requires_grad_(),
        "B": randn(batch_size, d_state, seq_len),
        "C": randn(batch_size, d_state, seq_len),
        "D": torch.ones(d_inner, device=device, requires_grad=True),
        "z": randn(batch_size, d_inner, seq_len),
        "delta_bias": torch.full((d_inner,), -3.0, device=device, requires_grad=True),
    }


def measure(
    scan: str,
    seq_len: int,
    *,
    batch_size: int = 2,
    d_inner: int = 512,
    d_state: int = 16,
    repeats: int = 3,
    min_seconds: float = MIN_TIMED_SECONDS,
    device: str | torch.device = "cpu",
    isolate_memory: bool = True,
) -> Measurement:
    """Median forward+backward time and peak extra memory of one scan at one length.

    The median is over at least ``repeats`` runs, and over as many more (up to 100) as a fast
    scan needs to run ``min_seconds`` in all. ``isolate_memory``: on CPU, measure the memory in
    a fresh process (see :func:`isolated_peak_bytes`); otherwise in this one.
    """
    device = torch.device(device)
    function = available_scans(device)[scan]
    inputs = scan_inputs(batch_size, d_inner, d_state, seq_len, device)

    def step() -> None:
        # positional: transformers names the first two arguments differently
        function(*inputs.values(), delta_softplus=True).sum().backward()
        for tensor in inputs.values():
            tensor.grad = None

    if device.type == "cpu" and (
        scan == "transformers" or scan == "sequential" and seq_len >= LONG_LOOP
    ):
        repeats, min_seconds = 1, 0.0
    seconds = median_seconds(step, repeats, device, min_total_seconds=min_seconds)
    if device.type == "cpu" and isolate_memory:
        peak = isolated_peak_bytes(scan, seq_len, batch_size, d_inner, d_state)
    else:
        peak = peak_memory_bytes(step, device)
    return Measurement(scan, seq_len, seconds, peak)


def isolated_peak_bytes(scan: str, seq_len: int, batch_size: int, d_inner: int, d_state: int):
    """CPU peak memory of one pass, measured in a fresh Python process.

    On CPU the peak is the process's resident high-water mark, and memory that ``malloc`` kept
    from earlier passes (of other scans or lengths) would be reused without showing up in it.
    """
    arguments = json.dumps([scan, seq_len, batch_size, d_inner, d_state])
    result = subprocess.run(
        [sys.executable, "-m", "bench.scan", "--peak-of", arguments],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],  # the repository root, where `bench` imports
    )
    value = json.loads(result.stdout.strip().splitlines()[-1])
    return None if value is None else int(value)


def _print_peak(arguments: str) -> None:
    scan, seq_len, batch_size, d_inner, d_state = json.loads(arguments)
    device = torch.device("cpu")
    function = available_scans(device)[scan]
    inputs = scan_inputs(batch_size, d_inner, d_state, seq_len, device)
    print(
        json.dumps(
            peak_memory_bytes(
                lambda: function(*inputs.values(), delta_softplus=True).sum().backward(), device
            )
        )
    )


def run(
    seq_lens=DEFAULT_SEQ_LENS,
    device: str | torch.device = "cpu",
    reference_max_len: int = REFERENCE_MAX_LEN,
    **kwargs,
) -> list[Measurement]:
    """Every available scan at every length (transformers' only up to ``reference_max_len``)."""
    scans = available_scans(torch.device(device))
    return [
        measure(scan, n, device=device, **kwargs)
        for n in seq_lens
        for scan in scans
        if scan != "transformers" or n <= reference_max_len
    ]


def format_table(results: list[Measurement]) -> str:
    """One row per length: each scan's time and memory, and its ratios to the sequential loop."""
    scans = list(dict.fromkeys(m.scan for m in results))
    others = [s for s in scans if s != "sequential"]
    by_key = {(m.scan, m.seq_len): m for m in results}
    header = "| L | " + " | ".join(f"{s} ms" for s in scans)
    header += " | " + " | ".join(f"sequential/{s} time" for s in others)
    header += " | " + " | ".join(f"{s} MiB" for s in scans)
    header += " | " + " | ".join(f"{s}/sequential mem" for s in others) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for n in sorted({m.seq_len for m in results}):
        row = {s: by_key.get((s, n)) for s in scans}
        base = row["sequential"]
        cells = [str(n)]
        cells += [_cell(row[s], lambda m: f"{m.seconds * 1e3:.1f}") for s in scans]
        cells += [_cell(row[s], lambda m, b=base: f"{b.seconds / m.seconds:.1f}×") for s in others]
        cells += [_cell(row[s], lambda m: format_mib(m.peak_bytes, 0)) for s in scans]
        cells += [
            _cell(row[s], lambda m, b=base: format_ratio(m.peak_bytes, b.peak_bytes))
            for s in others
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(measurement: Measurement | None, text: Callable[[Measurement], str]) -> str:
    return "—" if measurement is None else text(measurement)


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md and its README headline (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def _scan_measurements(data: Data) -> list[Measurement]:
    return [Measurement(**m) for m in data["measurements"]]


def _scan_index(data: Data) -> dict[tuple[str, int], dict]:
    return {(m["scan"], m["seq_len"]): m for m in data["measurements"]}


SCAN_OTHERS = ("chunked", "fused", "transformers", "cuda")


def scan_table(per_device: PerDevice) -> str:
    columns = [f"sequential / {s} time" for s in SCAN_OTHERS] + ["chunked / sequential memory"]
    cells = {}
    for device, data in per_device.items():
        index, rows = _scan_index(data), {}
        for (name, n), base in index.items():
            if name != "sequential":
                continue
            row = [_speedup(base, index.get((s, n))) for s in SCAN_OTHERS]
            chunked = index.get(("chunked", n))
            row.append(
                _ratio(chunked and chunked["peak_bytes"], base["peak_bytes"]) if chunked else "n/a"
            )
            rows[n] = row
        cells[device] = rows
    keys = _sorted_union(per_device, lambda d: (m["seq_len"] for m in d["measurements"]))
    return grouped_table("L", columns, cells, keys)


def _speedup(base: dict, other: dict | None) -> str:
    return MISSING if other is None else f"{base['seconds'] / other['seconds']:.1f}×"


def scan_reading(data: Data) -> str:
    index = _scan_index(data)
    n = max(m["seq_len"] for m in data["measurements"] if m["scan"] == "chunked")
    base, chunked = index[("sequential", n)], index[("chunked", n)]
    text = (
        f"at L = {n} the chunked scan is {base['seconds'] / chunked['seconds']:.1f}× as fast as "
        "the sequential loop"
    )
    if base["peak_bytes"] and chunked["peak_bytes"] is not None:
        text += f" and needs {chunked['peak_bytes'] / base['peak_bytes']:.2f}× its memory"
    for kernel, label in (("fused", "our compiled kernel"), ("cuda", "the CUDA kernel")):
        if (kernel, n) in index:
            other = index[(kernel, n)]
            text += f"; {label} is {base['seconds'] / other['seconds']:.1f}× as fast"
            text += f" ({chunked['seconds'] / other['seconds']:.1f}× the chunked scan)"
            if other["peak_bytes"] is not None and chunked["peak_bytes"]:
                text += (
                    f" and needs {other['peak_bytes'] / chunked['peak_bytes']:.2f}× the chunked "
                    "scan's memory"
                )
    return text + "."


def scan_detail(data: Data) -> str:
    return format_table(_scan_measurements(data))


def _headline_scan(data: Data) -> str:
    index = _scan_index(data)
    n = max(m["seq_len"] for m in data["measurements"] if m["scan"] == "chunked")
    best = "fused" if ("fused", n) in index else "chunked"
    return f"{index[('sequential', n)]['seconds'] / index[(best, n)]['seconds']:.1f}× (L = {n})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scan", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--d-inner", type=positive_int, default=512)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--min-seconds", type=non_negative_float, default=MIN_TIMED_SECONDS,
                        help="time fast scans until their runs add up to this long (at most "
                        "100 runs)")  # fmt: skip
    parser.add_argument("--reference-max-len", type=non_negative_int, default=REFERENCE_MAX_LEN)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", type=output_file,
                        help="also write the table to this Markdown file")  # fmt: skip
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one isolated measurement
    args = parser.parse_args(argv)
    if args.peak_of:
        _print_peak(args.peak_of)
        return
    print(
        f"Selective scan forward+backward on {args.device}: batch {args.batch_size}, d_inner "
        f"{args.d_inner}, d_state {args.d_state}. Time: median of at least {args.repeats} runs, "
        f"more for fast scans until they add up to {args.min_seconds:g} s (on CPU, "
        f"transformers' scan and the sequential loop at L ≥ {LONG_LOOP}: one run). "
        "Memory: peak extra memory of one pass. "
        f"transformers' reference only up to L = {args.reference_max_len}: its backward pass "
        "is O(L²)."
    )
    started = time.perf_counter()
    results = run(
        tuple(args.seq_lens),
        device=args.device,
        batch_size=args.batch_size,
        d_inner=args.d_inner,
        d_state=args.d_state,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        reference_max_len=args.reference_max_len,
    )
    table = format_table(results)
    print(table)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.save:
        _save(args.save, table, args)


def _save(path: str, table: str, args: argparse.Namespace) -> None:
    save_table(path, table, batch_size=args.batch_size, d_inner=args.d_inner,
               d_state=args.d_state, device=args.device)  # fmt: skip


def save_table(
    path: str | Path, table: str, *, batch_size: int, d_inner: int, d_state: int, device: str
) -> None:
    """Write ``table`` to the Markdown file ``path`` under a line naming the sizes and machine."""
    from .timing import machine_description

    lines = [
        f"Selective scan, forward + backward: batch {batch_size}, d_inner {d_inner}, "
        f"d_state {d_state}, on {machine_description(torch.device(device))}. "
        "Written by `python -m bench.scan`.",
        "",
        table,
        "",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
