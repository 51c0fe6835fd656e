"""Attention cost vs sequence length: full causal, all-local (sliding window) and mixed heads.

For each sequence length it times one forward + backward pass of :class:`minifusion.attention.
Attention` (the ``sdpa`` path the model uses) and measures the peak extra memory of that pass
twice: as the allocator (CUDA) or the process's resident size (CPU) sees it, which includes the
kernels' scratch memory but on CPU cannot resolve less than about a MiB, and as the exact bytes
of the tensors alive at the peak (:class:`bench.memory.LiveTensorBytes`), which resolves every
byte but leaves out the kernels' scratch. It prints a table with each pattern's ratio to full
causal attention.

:func:`attention_table`, :func:`attention_reading` and :func:`attention_detail` render its
section of ``bench/RESULTS.md`` from the data :mod:`bench.report` stores (one column group
per device), :func:`_headline_attention` its rows of the README's headline table.

    python -m bench.attention                       # CPU-friendly defaults, < 2 minutes
    python -m bench.attention --seq-lens 1024 4096 --window 256 --device cuda
"""

import argparse
import time
from dataclasses import dataclass

import torch

from minifusion.attention import Attention
from minifusion.config import MiniFusionConfig
from minifusion.rope import RotaryEmbedding

from .arguments import positive_int
from .memory import LiveTensorBytes, format_mib, format_ratio, peak_memory_bytes
from .tables import Data, PerDevice, _ratio, _sorted_union, grouped_table
from .timing import median_seconds

PATTERNS = ("full", "local", "mixed")
DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096, 8192)


@dataclass
class Measurement:
    pattern: str
    seq_len: int
    seconds: float  # median forward+backward time
    peak_bytes: int | None  # allocator (CUDA) or resident-size (CPU) peak; None: not measurable
    tensor_peak_bytes: int | None = None  # exact tensor bytes at the peak (None: older records)


def attention_config(
    pattern: str, hidden_size: int, num_heads: int, num_kv_heads: int, window: int
) -> MiniFusionConfig:
    """``full``: every head global; ``local``: every head windowed; ``mixed``: half and half."""
    global_heads = {"full": num_heads, "local": 0, "mixed": num_heads // 2}[pattern]
    return MiniFusionConfig(
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        sliding_window=None if pattern == "full" else window,
        num_global_heads=global_heads,
        max_position_embeddings=max(DEFAULT_SEQ_LENS),
    )


def measure(
    pattern: str,
    seq_len: int,
    *,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    window: int = 256,
    batch_size: int = 1,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> Measurement:
    """Median time of ``repeats`` forward+backward passes (after one warm-up), the pass's peak
    memory as the device reports it, and the exact bytes of its tensors at their peak."""
    device = torch.device(device)
    torch.manual_seed(0)
    config = attention_config(pattern, hidden_size, num_heads, num_kv_heads, window)
    attention = Attention(config).to(device)
    rope = RotaryEmbedding(config, device=device)
    x = torch.randn(batch_size, seq_len, hidden_size, device=device, requires_grad=True)
    cos_sin = rope(torch.arange(seq_len, device=device)[None].expand(batch_size, -1))

    def step() -> None:
        attention(x, cos_sin).sum().backward()
        x.grad = None
        attention.zero_grad(set_to_none=True)

    seconds = median_seconds(step, repeats, device)
    peak = peak_memory_bytes(step, device)
    with LiveTensorBytes() as tensors:
        step()
    return Measurement(pattern, seq_len, seconds, peak, tensors.peak)


def run(seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS, **kwargs) -> list[Measurement]:
    return [measure(pattern, n, **kwargs) for n in seq_lens for pattern in PATTERNS]


def format_table(results: list[Measurement]) -> str:
    """One row per length: time and memory of each pattern and its ratio to full attention.

    ``MiB`` / ``mem``: the peak as the device reports it (:func:`bench.memory.peak_memory_bytes`);
    ``tensor MiB`` / ``tensors``: the exact bytes of the tensors alive at the peak."""
    by_key = {(m.pattern, m.seq_len): m for m in results}
    lengths = sorted({m.seq_len for m in results})
    header = (
        "| T | full ms | local ms | mixed ms | local/full time | mixed/full time "
        "| full MiB | local MiB | mixed MiB | local/full mem | mixed/full mem "
        "| full tensor MiB | local tensor MiB | mixed tensor MiB | local/full tensors "
        "| mixed/full tensors |"
    )
    lines = [header, _separator(header)]
    for n in lengths:
        full, local, mixed = (by_key[(p, n)] for p in PATTERNS)
        row = [str(n)]
        row += [f"{m.seconds * 1e3:.1f}" for m in (full, local, mixed)]
        row += [f"{m.seconds / full.seconds:.2f}" for m in (local, mixed)]
        row += [format_mib(m.peak_bytes) for m in (full, local, mixed)]
        row += [format_ratio(m.peak_bytes, full.peak_bytes) for m in (local, mixed)]
        row += [format_mib(m.tensor_peak_bytes, 2) for m in (full, local, mixed)]
        row += [_exact_ratio(m.tensor_peak_bytes, full.tensor_peak_bytes) for m in (local, mixed)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _exact_ratio(value: int | None, reference: int | None) -> str:
    """Three decimals: exact byte counts can tell differences a resident size cannot."""
    return format_ratio(value, reference, digits=3)


def _separator(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md and its README headline (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def _attention_index(data: Data) -> dict[tuple[str, int], dict]:
    return {(m["pattern"], m["seq_len"]): m for m in data["measurements"]}


def attention_table(per_device: PerDevice) -> str:
    columns = ["local / full time", "mixed / full time", "local / full memory",
               "mixed / full memory", "local / full tensor bytes",
               "mixed / full tensor bytes"]  # fmt: skip
    cells = {}
    for device, data in per_device.items():
        index, rows = _attention_index(data), {}
        for (pattern, n), full in index.items():
            if pattern != "full":
                continue
            local, mixed = index[("local", n)], index[("mixed", n)]
            rows[n] = [
                _ratio(local["seconds"], full["seconds"]),
                _ratio(mixed["seconds"], full["seconds"]),
                _ratio(local["peak_bytes"], full["peak_bytes"]),
                _ratio(mixed["peak_bytes"], full["peak_bytes"]),
                _exact_ratio(local.get("tensor_peak_bytes"), full.get("tensor_peak_bytes")),
                _exact_ratio(mixed.get("tensor_peak_bytes"), full.get("tensor_peak_bytes")),
            ]
        cells[device] = rows
    keys = _sorted_union(per_device, lambda d: (m["seq_len"] for m in d["measurements"]))
    return grouped_table("T", columns, cells, keys)


def attention_reading(data: Data) -> str:
    index = _attention_index(data)
    n = max(m["seq_len"] for m in data["measurements"])
    full, local = index[("full", n)], index[("local", n)]
    text = (
        f"at T = {n} all-local heads take {local['seconds'] / full['seconds']:.2f}× the time of "
        "full causal attention"
    )
    if full["peak_bytes"] and local["peak_bytes"] is not None:
        text += f" and {local['peak_bytes'] / full['peak_bytes']:.2f}× its peak memory"
    full_tensors, local_tensors = full.get("tensor_peak_bytes"), local.get("tensor_peak_bytes")
    if full_tensors and local_tensors is not None:
        text += (
            f"; counted exactly, its tensors peak at {local_tensors / 2**20:.2f} MiB against "
            f"{full_tensors / 2**20:.2f} MiB ({local_tensors / full_tensors:.3f}×, "
            f"{(local_tensors - full_tensors) / 2**20:+.2f} MiB)"
        )
    return text + "."


def attention_detail(data: Data) -> str:
    return format_table([Measurement(**m) for m in data["measurements"]])


def _headline_attention(data: Data, key: str) -> str | None:
    """All-local over full heads at the longest T for ``key`` (``None``: not in the record)."""
    index = _attention_index(data)
    n = max(m["seq_len"] for m in data["measurements"])
    local, full = index[("local", n)].get(key), index[("full", n)].get(key)
    if key == "tensor_peak_bytes":
        return None if local is None or not full else f"{_exact_ratio(local, full)}× (T = {n})"
    return f"{_ratio(local, full, '×')} (T = {n})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attention", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    parser.add_argument("--hidden-size", type=positive_int, default=256)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--window", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    print(
        f"Attention forward+backward on {args.device}: hidden {args.hidden_size}, {args.heads} "
        f"query heads / {args.kv_heads} KV heads, window {args.window}, batch {args.batch_size}. "
        "'mixed' = half global, half local heads. Memory = peak extra memory of one pass "
        "(MiB: as the device reports it; tensor MiB: the exact bytes of the tensors alive)."
    )
    started = time.perf_counter()
    results = run(
        tuple(args.seq_lens),
        hidden_size=args.hidden_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        window=args.window,
        batch_size=args.batch_size,
        repeats=args.repeats,
        device=args.device,
    )
    print(format_table(results))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
