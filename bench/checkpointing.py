"""Activation checkpointing: none, branches only, whole layers — peak memory and step time.

One training step (forward + backward, bf16 autocast on a GPU, fp32 on the CPU) of a preset's
model (``small`` by default: 8 hybrid layers, width 512, every second FFN a Mixture-of-Experts)
on random tokens, three ways:

* ``none`` — every activation autograd needs is kept from forward to backward;
* ``branches`` — FusionTree's branch-selective checkpointing: the attention and Mamba branches
  keep only their input and run again in backward (``model.checkpoint_branches()``);
* ``layers`` — whole-layer checkpointing: each layer keeps only its input and runs again
  (``model.activation_checkpointing_enable()``).

Memory is the peak over what was in use before the step (the weights; the gradients are freed
between steps, so they count in every row alike), measured by :mod:`bench.memory` twice: the
device's peak (on CPU the process's resident size, which also holds the allocator's slack and the
libraries' scratch memory), and the exact peak of the tensors the step creates
(:class:`~bench.memory.LiveTensorBytes`, the same on every run). Time is the best of
``--repeats`` steps after a warm-up. The table gives each relative to ``none``.

:func:`checkpointing_table` renders its section of ``bench/RESULTS.md`` (each device's
:func:`markdown`) from the data :mod:`bench.report` stores.

    python -m bench.checkpointing                       # small, batch 2 × 512 tokens
    python -m bench.checkpointing --preset tiny --batch-size 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM

from . import RESULTS_DIR
from .arguments import positive_int
from .memory import LiveTensorBytes, format_mib, format_ratio, peak_memory_bytes
from .tables import PerDevice, _device_blocks
from .timing import machine_description
from .training import best_seconds

MODES = ("none", "branches", "layers")
RESULTS_FILE = RESULTS_DIR / "checkpointing.json"


@dataclass
class CheckpointingResult:
    mode: str
    peak_bytes: int | None
    seconds: float
    tensor_peak_bytes: int | None = None  # exact: the tensors the step creates, at their peak


def build(preset: str, mode: str, device: torch.device) -> MiniFusionForCausalLM:
    """The preset's model on ``device`` in training mode, with ``mode``'s checkpointing."""
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(MiniFusionConfig.from_preset(preset)).to(device).train()
    if mode == "branches":
        model.checkpoint_branches()
    elif mode == "layers":
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif mode != "none":
        raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
    return model


def training_step(model: MiniFusionForCausalLM, ids: torch.Tensor) -> Callable[[], None]:
    """One forward + backward on ``ids`` (bf16 autocast on CUDA), gradients freed after."""
    device = ids.device
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def measure(
    preset: str = "small",
    batch_size: int = 2,
    seq_len: int = 512,
    repeats: int = 4,
    device: torch.device | None = None,
    memory_runs: int = 2,
) -> list[CheckpointingResult]:
    """Peak memory and best step time of each mode (the same weights and tokens in all).

    Time: the three models side by side, ``repeats`` rounds of one step of each mode in turn,
    so a slow spell of a shared machine slows every mode alike. Memory: one freshly built model
    per mode, on CPU in a fresh process (:func:`_peak`), the lowest of ``memory_runs`` such
    processes: the resident-size counters also see shared-library pages and the allocator's
    reuse, which vary from one process to the next and only ever add to the step's own peak."""
    device = device or torch.device("cpu")
    vocab_size = MiniFusionConfig.from_preset(preset).vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    steps = {mode: training_step(build(preset, mode, device), ids) for mode in MODES}
    best = dict.fromkeys(MODES, float("inf"))
    for step in steps.values():
        step()  # first-use costs (allocator, kernels) outside the measurement
    for _ in range(repeats):
        for mode, step in steps.items():
            best[mode] = min(best[mode], best_seconds(step, 1, device, warm_up=False))
    tensor_peaks = {}
    for mode, step in steps.items():
        with LiveTensorBytes() as count:
            step()
        tensor_peaks[mode] = count.peak
    steps.clear()
    peaks = {mode: [_peak(preset, mode, ids) for _ in range(memory_runs)] for mode in MODES}
    return [
        CheckpointingResult(mode, None if None in peaks[mode] else min(peaks[mode]), best[mode],
                            tensor_peaks[mode])  # fmt: skip
        for mode in MODES
    ]


def _peak(preset: str, mode: str, ids: torch.Tensor) -> int | None:
    """Peak memory of one step; on CPU in a fresh Python process, whose resident high-water mark
    no earlier step (of this or another mode) has disturbed."""
    if ids.device.type == "cpu":
        arguments = json.dumps([preset, mode, ids.tolist()])
        result = subprocess.run(
            [sys.executable, "-m", "bench.checkpointing", "--peak-of", arguments],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        value = json.loads(result.stdout.strip().splitlines()[-1])
        return None if value is None else int(value)
    return _peak_here(preset, mode, ids)


def _peak_here(preset: str, mode: str, ids: torch.Tensor) -> int | None:
    step = training_step(build(preset, mode, ids.device), ids)
    step()  # first-use costs outside the measurement
    return peak_memory_bytes(step, ids.device)


def markdown(record: dict[str, Any]) -> str:
    """The table of one saved record, memory and time relative to ``none``."""
    rows = {r["mode"]: r for r in record["results"]}
    base = rows["none"]
    s = record["settings"]
    lines = [
        f"`{s['preset']}`, batch {s['batch_size']} × {s['seq_len']} tokens, "
        f"{record['machine']}, {record['date']}.",
        "",
        "| checkpointing | peak memory MiB | × none | tensors at their peak MiB | × none | step s "
        "| × none |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = rows[mode]
        tensors = r.get("tensor_peak_bytes")  # absent from records saved before it was counted
        lines.append(
            f"| {mode} | {format_mib(r['peak_bytes'])} "
            f"| {format_ratio(r['peak_bytes'], base['peak_bytes'])} | {format_mib(tensors)} "
            f"| {format_ratio(tensors, base.get('tensor_peak_bytes'))} | {r['seconds']:.2f} "
            f"| {r['seconds'] / base['seconds']:.2f} |"
        )
    return "\n".join(lines)


def run(
    preset: str = "small", batch_size: int = 2, seq_len: int = 512, repeats: int = 4,
    device: torch.device | None = None, memory_runs: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Measure and return the record that :func:`markdown` and chapter 12 read."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    results = measure(preset, batch_size, seq_len, repeats, device, memory_runs)
    return {
        "settings": {
            "preset": preset,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "repeats": repeats,
            "device": device.type,
        },  # fmt: skip
        "machine": machine_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.perf_counter() - started,
        "results": [asdict(r) for r in results],
    }


def save(record: dict[str, Any], path: Path = RESULTS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def checkpointing_table(per_device: PerDevice) -> str:
    """Each device's table from :func:`markdown`."""
    return _device_blocks(per_device, lambda data: markdown(data["record"]),
                          "Not run yet: `python -m bench.checkpointing`.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkpointing",
        description="Peak memory and step time of one training step with no activation "
        "checkpointing, branch-selective checkpointing and whole-layer checkpointing.",
    )
    parser.add_argument("--preset", default="small", help="model preset (%(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=2,
                        help="sequences (%(default)s)")  # fmt: skip
    parser.add_argument("--seq-len", type=positive_int, default=512,
                        help="tokens each (%(default)s)")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=4, help="timed steps (%(default)s)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS_FILE.name}")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # [preset, mode, ids]: one peak
    args = parser.parse_args(argv)
    if args.peak_of:
        preset, mode, ids = json.loads(args.peak_of)
        print(json.dumps(_peak_here(preset, mode, torch.tensor(ids))))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = run(args.preset, args.batch_size, args.seq_len, args.repeats, device)
    print(markdown(record))
    if not args.no_save:
        save(record)
        print(f"\nsaved to {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
