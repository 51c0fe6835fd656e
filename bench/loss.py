"""The loss with and without the logits: full ``(tokens, vocab)`` logits vs the chunked loss.

Two measurements, each side by side in one run (the variants take turns, repeat after repeat, so
a slow spell of the machine slows both):

* **the head and its loss alone** — forward + backward of ``cross_entropy(h Wᵀ, targets)`` for a
  few (tokens, hidden, vocabulary) shapes: the presets' training shapes, written the plain way
  (the whole logits, what :func:`minifusion.training.compute_loss` does by default) and by
  :func:`minifusion.chunked_loss.chunked_cross_entropy`; median time and peak memory of each;
* **whole training steps of ``tiny``** at ``make train``'s shape — forward, backward, clipping and
  AdamW — with each loss: what a user of ``--set train.loss_chunk_rows=128`` feels.

:func:`loss_table`, :func:`loss_reading` and :func:`loss_detail` render its section of
``bench/RESULTS.md`` from the data :mod:`bench.report` stores (one column group per device).

    python -m bench.loss
    python -m bench.loss --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from minifusion.chunked_loss import chunked_cross_entropy, default_chunk_rows
from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM
from minifusion.training import TrainConfig, build_optimizer, compute_loss

from .arguments import positive_int
from .memory import format_mib, peak_memory_bytes
from .tables import Data, PerDevice, _ratio, grouped_table
from .timing import side_by_side_seconds

# (name, tokens per step, hidden size, vocabulary): the presets' training shapes. On a CPU the
# 250M preset's head is measured for one sequence of its context (a GPU step holds 8 of them).
CPU_SHAPES = (("tiny", 16 * 256, 128, 4096), ("small", 16 * 512, 512, 8192),
              ("fineweb-edu-250m", 2048, 1024, 32000))  # fmt: skip
GPU_SHAPES = (("tiny", 16 * 256, 128, 4096), ("small", 16 * 512, 512, 8192),
              ("fineweb-edu-250m", 8 * 2048, 1024, 32000))  # fmt: skip
TRAINING_SHAPE = ("tiny", 16, 256)  # preset, batch size, sequence length: `make train` on CPU
VARIANTS = ("full", "chunked")


def head_steps(
    tokens: int, hidden: int, vocab: int, chunk_rows: int, device: torch.device
) -> dict[str, Callable[[], None]]:
    """Forward + backward of the head's loss, the full-logits way and the chunked way."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device)
    w.requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)

    def full() -> None:
        F.cross_entropy((h @ w.t()).float(), targets).backward()
        h.grad = w.grad = None

    def chunked() -> None:
        chunked_cross_entropy(h, w, targets, chunk_rows).backward()
        h.grad = w.grad = None

    return {"full": full, "chunked": chunked}


def training_steps(
    preset: str, batch_size: int, seq_len: int, chunk_rows: int, device: torch.device
) -> dict[str, Callable[[], None]]:
    """One optimizer step of ``preset`` with each loss (two models, the same weights)."""
    config = MiniFusionConfig.from_preset(preset)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(0, config.vocab_size, (2, batch_size, seq_len),
                                    generator=generator).to(device).unbind(0)  # fmt: skip
    train = TrainConfig(lr=1e-4)  # small steps: the models stay near their start
    steps = {}
    for name, rows in zip(VARIANTS, (0, chunk_rows)):
        torch.manual_seed(0)
        model = MiniFusionForCausalLM(config).to(device).train()
        optimizer = build_optimizer(model, train)

        def step(model=model, optimizer=optimizer, rows=rows) -> None:
            compute_loss(model, inputs, targets, rows).total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def run(
    shapes: tuple[tuple[str, int, int, int], ...] | None = None,
    training_shape: tuple[str, int, int] | None = TRAINING_SHAPE,
    chunk_rows: int | None = None,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> Data:
    """Time and peak memory of both losses per shape, then tiny's training steps with each.

    ``chunk_rows``: rows per slice; ``None``: each head's :func:`default_chunk_rows`."""
    device = torch.device(device)
    if shapes is None:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    heads, training = [], None
    for name, tokens, hidden, vocab in shapes:
        rows = chunk_rows or default_chunk_rows(vocab, hidden)
        steps = head_steps(tokens, hidden, vocab, rows, device)
        seconds = side_by_side_seconds(steps, repeats, device)
        heads.append({"shape": name, "tokens": tokens, "hidden": hidden, "vocab": vocab,
                      "chunk_rows": rows, **{f"{v}_seconds": seconds[v] for v in VARIANTS}})  # fmt: skip
    if training_shape is not None:
        preset, batch_size, seq_len = training_shape
        config = MiniFusionConfig.from_preset(preset)
        rows = chunk_rows or default_chunk_rows(config.vocab_size, config.hidden_size)
        steps = training_steps(preset, batch_size, seq_len, rows, device)
        seconds = side_by_side_seconds(steps, repeats, device)
        training = {"preset": preset, "batch_size": batch_size, "seq_len": seq_len,
                    "chunk_rows": rows, **{f"{v}_seconds": seconds[v] for v in VARIANTS}}  # fmt: skip
    # Memory after every timing: measuring it on a CPU sets malloc to hand blocks back to the
    # system at once (bench.memory), which would slow whatever is timed after it.
    for row in heads:
        steps = head_steps(row["tokens"], row["hidden"], row["vocab"], row["chunk_rows"], device)
        for variant, step in steps.items():
            step()  # first-use costs outside the measurement
            row[f"{variant}_peak_bytes"] = peak_memory_bytes(step, device)
    return {"heads": heads, "training": training}


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def _shape_label(row: dict[str, Any]) -> str:
    return (f"{row['shape']}: {row['tokens']:,} tokens, H {row['hidden']:,}, V {row['vocab']:,}, "
            f"slices of {row['chunk_rows']:,}")  # fmt: skip


def loss_table(per_device: PerDevice) -> str:
    cells: dict[str, dict[Any, list[str]]] = {}
    for device, data in per_device.items():
        rows = cells.setdefault(device, {})
        for row in data["heads"]:
            rows[row["shape"]] = [
                _ratio(row["chunked_seconds"], row["full_seconds"]),
                _ratio(row.get("chunked_peak_bytes"), row.get("full_peak_bytes")),
            ]
        if data.get("training"):
            t = data["training"]
            rows["training step"] = [_ratio(t["chunked_seconds"], t["full_seconds"]), "—"]
    keys = [*dict.fromkeys(r["shape"] for d in per_device.values() for r in d["heads"])]
    label = {"training step": "whole training step of `tiny` (16 × 256 tokens)"}
    return grouped_table("loss of", ["chunked / full time", "chunked / full memory"], cells,
                         [*keys, "training step"], label=lambda k: label.get(k, f"head of {k}"))  # fmt: skip


def loss_reading(data: Data) -> str:
    largest = max(data["heads"], key=lambda r: r["tokens"] * r["vocab"])
    parts = [
        f"for {largest['shape']}'s head ({largest['tokens']:,} tokens × {largest['vocab']:,} "
        f"logits) the chunked loss takes {_ratio(largest['chunked_seconds'], largest['full_seconds'])}× "
        f"the time and {_ratio(largest.get('chunked_peak_bytes'), largest.get('full_peak_bytes'))}× "
        "the peak memory of the full logits"
    ]
    if data.get("training"):
        t = data["training"]
        speed = t["full_seconds"] / t["chunked_seconds"]
        parts.append(f"a whole training step of `{t['preset']}` runs {speed:.2f}× as fast with it")
    return "; ".join(parts) + "."


def loss_detail(data: Data) -> str:
    lines = ["| shape | full ms | chunked ms | chunked / full time | full MiB | chunked MiB | "
             "chunked / full memory |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in data["heads"]:
        lines.append(
            f"| {_shape_label(row)} | {row['full_seconds'] * 1e3:.1f} | "
            f"{row['chunked_seconds'] * 1e3:.1f} | "
            f"{_ratio(row['chunked_seconds'], row['full_seconds'])} | "
            f"{format_mib(row.get('full_peak_bytes'))} | "
            f"{format_mib(row.get('chunked_peak_bytes'))} | "
            f"{_ratio(row.get('chunked_peak_bytes'), row.get('full_peak_bytes'))} |"
        )
    if data.get("training"):
        t = data["training"]
        tokens = t["batch_size"] * t["seq_len"]
        lines += ["", f"| training step of `{t['preset']}`, {t['batch_size']} × {t['seq_len']} "
                  f"tokens (slices of {t['chunk_rows']}) | ms per step | tokens/s |", "|---|---|---|"]  # fmt: skip
        for variant, what in zip(VARIANTS, ("full logits", "chunked loss")):
            seconds = t[f"{variant}_seconds"]
            lines.append(f"| {what} | {seconds * 1e3:.0f} | {tokens / seconds:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loss", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--chunk-rows", type=positive_int, default=None,
                        help="rows per slice of the chunked loss (default: each head's "
                             "minifusion.chunked_loss.default_chunk_rows)")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = run(chunk_rows=args.chunk_rows, repeats=args.repeats, device=args.device)
    print(loss_detail(data))
    print(loss_reading(data))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
