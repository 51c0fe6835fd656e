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
between steps, so they count in every row alike), measured by :mod:`bench.memory`; time is the
best of ``--repeats`` steps after a warm-up. The table gives both relative to ``none``.

    python -m bench.checkpointing                       # small, batch 2 × 512 tokens
    python -m bench.checkpointing --preset tiny --batch-size 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM

from .memory import format_mib, peak_memory_bytes
from .timing import machine_description
from .training import best_seconds

MODES = ("none", "branches", "layers")
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "checkpointing.json"


@dataclass
class CheckpointingResult:
    mode: str
    peak_bytes: int | None
    seconds: float


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


def measure_mode(
    preset: str, mode: str, batch_size: int, seq_len: int, repeats: int, device: torch.device
) -> CheckpointingResult:
    """Peak memory and best step time of one mode (its model freed when this returns)."""
    model = build(preset, mode, device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    ids = ids.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # first-use costs (allocator, kernels) outside the measurement
    peak = peak_memory_bytes(step, device)
    return CheckpointingResult(mode, peak, best_seconds(step, repeats, device))


def measure(
    preset: str = "small",
    batch_size: int = 2,
    seq_len: int = 512,
    repeats: int = 2,
    device: torch.device | None = None,
) -> list[CheckpointingResult]:
    """Peak memory and best step time of each mode (one model at a time)."""
    device = device or torch.device("cpu")
    return [measure_mode(preset, m, batch_size, seq_len, repeats, device) for m in MODES]


def markdown(record: dict[str, Any]) -> str:
    """The table of one saved record, memory and time relative to ``none``."""
    rows = {r["mode"]: r for r in record["results"]}
    base = rows["none"]
    s = record["settings"]
    lines = [
        f"`{s['preset']}`, batch {s['batch_size']} × {s['seq_len']} tokens, "
        f"{record['machine']}, {record['date']}.",
        "",
        "| checkpointing | peak memory MiB | × none | step s | × none |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = rows[mode]
        memory = (
            "n/a"
            if r["peak_bytes"] is None or not base["peak_bytes"]
            else f"{r['peak_bytes'] / base['peak_bytes']:.2f}"
        )
        lines.append(
            f"| {mode} | {format_mib(r['peak_bytes'])} | {memory} | {r['seconds']:.2f} "
            f"| {r['seconds'] / base['seconds']:.2f} |"
        )
    return "\n".join(lines)


def run(
    preset: str = "small", batch_size: int = 2, seq_len: int = 512, repeats: int = 2,
    device: torch.device | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Measure and return the record that :func:`markdown` and chapter 12 read."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    results = measure(preset, batch_size, seq_len, repeats, device)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkpointing",
        description="Peak memory and step time of one training step with no activation "
        "checkpointing, branch-selective checkpointing and whole-layer checkpointing.",
    )
    parser.add_argument("--preset", default="small", help="model preset (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences (%(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens each (%(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps (%(default)s)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS_FILE.name}")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = run(args.preset, args.batch_size, args.seq_len, args.repeats, device)
    print(markdown(record))
    if not args.no_save:
        save(record)
        print(f"\nsaved to {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
