"""Mixture-of-Experts dispatch: a per-token loop vs grouped dispatch vs a dense SwiGLU.

All three compute a feed-forward layer with the same *active* parameters per token:

* ``loop`` — the naive way: for every token, run each of its ``k`` chosen experts on that one
  token (``N · k`` tiny matmuls);
* ``grouped`` — :class:`minifusion.moe.MoE`: tokens grouped by expert, one matmul per expert;
* ``dense`` — one :class:`minifusion.mlp.SwiGLU` whose width is ``k · moe_intermediate_size``,
  i.e. the compute a token pays in the MoE layer, without any routing.

It prints the median forward+backward time of each and the ratios to ``dense``.

:func:`moe_table`, :func:`moe_reading` and :func:`moe_detail` render its section of
``bench/RESULTS.md`` from the data :mod:`bench.report` stores (one column group per device).

    python -m bench.moe
    python -m bench.moe --tokens 4096 --experts 16 --top-k 2 --device cuda
"""

import argparse
import time

import torch

from minifusion.config import MiniFusionConfig
from minifusion.mlp import SwiGLU
from minifusion.moe import MoE

from .arguments import positive_int
from .tables import Data, PerDevice, _ratio, grouped_table
from .timing import median_seconds


def loop_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The same function as ``moe(x).hidden_states``, one token and one expert at a time."""
    tokens = x.reshape(-1, x.shape[-1])
    route = moe.router(tokens)
    rows = []
    for t in range(tokens.shape[0]):
        row = tokens.new_zeros(tokens.shape[-1])
        for slot in range(moe.top_k):
            expert = moe.experts[int(route.expert_index[t, slot])]
            row = row + route.expert_weight[t, slot] * expert(tokens[t : t + 1])[0]
        rows.append(row)
    return torch.stack(rows).view_as(x)


def run(
    *,
    tokens: int = 1024,
    hidden_size: int = 256,
    num_experts: int = 8,
    top_k: int = 2,
    expert_size: int = 512,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Median forward+backward seconds for ``loop``, ``grouped`` and ``dense``."""
    device = torch.device(device)
    torch.manual_seed(0)
    config = MiniFusionConfig(
        hidden_size=hidden_size,
        num_attention_heads=4,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        moe_intermediate_size=expert_size,
    )
    moe = MoE(config).to(device)
    dense = SwiGLU(config, intermediate_size=top_k * expert_size).to(device)
    x = torch.randn(1, tokens, hidden_size, device=device, requires_grad=True)

    with torch.no_grad():  # the loop really computes the same thing
        difference = (loop_forward(moe, x[:, :64]) - moe(x[:, :64]).hidden_states).abs().max()
    assert difference < 1e-4, f"loop and grouped dispatch disagree by {difference:.2e}"

    def backward(output: torch.Tensor) -> None:
        output.square().mean().backward()
        x.grad = None

    candidates = {
        "loop": lambda: backward(loop_forward(moe, x)),
        "grouped": lambda: backward(moe(x).hidden_states),
        "dense": lambda: backward(dense(x)),
    }
    return {name: median_seconds(step, repeats, device) for name, step in candidates.items()}


def format_table(seconds: dict[str, float]) -> str:
    lines = ["| dispatch | ms per forward+backward | ratio to dense |", "|---|---|---|"]
    for name, value in seconds.items():
        lines.append(f"| {name} | {value * 1e3:.1f} | {value / seconds['dense']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
MOE_ROWS = {"loop": "per-token loop", "grouped": "grouped dispatch", "dense": "dense SwiGLU"}


def moe_table(per_device: PerDevice) -> str:
    cells = {
        device: {
            name: [f"{value * 1e3:.1f}", _ratio(value, data["seconds"]["dense"])]
            for name, value in data["seconds"].items()
        }
        for device, data in per_device.items()
    }
    return grouped_table(
        "dispatch", ["ms", "ratio to dense"], cells, list(MOE_ROWS), label=MOE_ROWS.get
    )


def moe_reading(data: Data) -> str:
    s = data["seconds"]
    return (
        f"grouped dispatch takes {s['grouped'] / s['dense']:.2f}× the time of a dense SwiGLU "
        f"with the same active parameters; the per-token loop {s['loop'] / s['dense']:.1f}×."
    )


def moe_detail(data: Data) -> str:
    # the stored JSON has its keys sorted: put the rows back in the benchmark's order
    return format_table({name: data["seconds"][name] for name in MOE_ROWS})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.moe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tokens", type=positive_int, default=1024)
    parser.add_argument("--hidden-size", type=positive_int, default=256)
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--top-k", type=positive_int, default=2)
    parser.add_argument("--expert-size", type=positive_int, default=512)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(
        f"MoE layer on {args.device}: {args.tokens} tokens, hidden {args.hidden_size}, "
        f"{args.experts} experts of width {args.expert_size}, top-{args.top_k}; dense = one "
        f"SwiGLU of width {args.top_k * args.expert_size} (the same active parameters)."
    )
    started = time.perf_counter()
    seconds = run(
        tokens=args.tokens,
        hidden_size=args.hidden_size,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_size=args.expert_size,
        repeats=args.repeats,
        device=args.device,
    )
    print(format_table(seconds))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
