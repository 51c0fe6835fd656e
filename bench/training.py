"""Training throughput and model-FLOPs utilisation (MFU), both measured in the same run.

Two measurements on one device:

* **a dense-matmul peak** — the best FLOP/s of square ``n × n @ n × n`` matrix products
  (``2n³`` FLOPs each) in the dtype training computes in (fp32 on CPU, bf16 on CUDA): what this
  device, with this PyTorch, can do at best on the operation models are made of;
* **training tokens/s** of a preset — full optimizer steps (forward, backward, clipping, AdamW)
  on random tokens, built from :mod:`minifusion.training`'s pieces, timed after a warm-up.

MFU relates them: ``3 × forward FLOPs per token × tokens/s ÷ peak`` (a backward pass costs about
twice a forward pass, so a training step costs about three forwards; the forward FLOPs come
from :meth:`~minifusion.config.MiniFusionConfig.estimate_flops_per_token`).

:func:`training_table`, :func:`training_reading` and :func:`training_detail` render its
section of ``bench/RESULTS.md`` from the data :mod:`bench.report` stores (one column group
per device), :func:`_headline_training` a preset's row of the README's headline table.

    python -m bench.training                           # tiny (and small) on CPU
    python -m bench.training --presets small --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM
from minifusion.moe import MoE
from minifusion.training import TrainConfig, autocast_dtype, build_optimizer, compute_loss

from .arguments import non_negative_int, positive_int
from .tables import MISSING, Data, PerDevice, grouped_table
from .timing import synchronize

DEFAULT_MATMUL_SIZES = (1024, 2048)
# (batch size, sequence length) per preset. tiny: what `make train` runs on CPU.
CPU_SHAPES = {"tiny": (16, 256), "small": (2, 512)}
GPU_SHAPES = {"tiny": (16, 256), "small": (16, 512)}
# A training step forward + backward costs about 3 forward passes (backward ≈ 2 × forward).
TRAINING_FLOPS_PER_FORWARD = 3.0


@dataclass
class MatmulPeak:
    """The fastest square matmul seen: ``flops_per_s = 2 n³ / seconds``."""

    size: int  # n
    dtype: str  # "float32" or "bfloat16"
    seconds: float  # best time of one product
    flops_per_s: float


@dataclass
class TrainingMeasurement:
    """Training throughput of one preset on one device."""

    preset: str
    parameters: int
    batch_size: int
    seq_len: int
    precision: str  # the autocast dtype, "float32" without autocast
    steps: int  # timed optimizer steps (after the warm-up ones)
    seconds_per_step: float  # median
    flops_per_token: float  # forward FLOPs per token at seq_len (the config's estimate)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.seq_len / self.seconds_per_step

    @property
    def model_flops_per_s(self) -> float:
        """FLOP/s the training step does by the model's count (3 × forward)."""
        return TRAINING_FLOPS_PER_FORWARD * self.flops_per_token * self.tokens_per_s


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model-FLOPs utilisation: ``3 × flops_per_token × tokens_per_s ÷ peak`` (a fraction).

    ``flops_per_token`` counts a forward pass; training does about three times that.
    """
    return TRAINING_FLOPS_PER_FORWARD * flops_per_token * tokens_per_s / peak_flops_per_s


def best_seconds(
    step: Callable[[], object], repeats: int, device: torch.device, warm_up: bool = True
) -> float:
    """Fastest wall-clock seconds of ``step()`` over ``repeats`` runs after one warm-up run
    (``warm_up=False``: the caller has warmed it up).

    The best, not the median: a peak is what the device can do when nothing disturbs it.
    """
    if warm_up:
        step()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_dtype(device: torch.device) -> torch.dtype:
    """The dtype training computes in on ``device`` (the ``auto`` precision of chapter 12)."""
    return autocast_dtype("auto", device) or torch.float32


def measure_matmul_peak(
    sizes: tuple[int, ...] = DEFAULT_MATMUL_SIZES,
    *,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> MatmulPeak:
    """Best FLOP/s of ``n × n`` matrix products over ``sizes`` (``repeats`` runs of each)."""
    device = torch.device(device)
    dtype = matmul_dtype(device)
    best: MatmulPeak | None = None
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
        seconds = best_seconds(lambda a=a, b=b: a @ b, repeats, device)
        flops_per_s = 2.0 * n**3 / seconds
        if best is None or flops_per_s > best.flops_per_s:
            best = MatmulPeak(n, str(dtype).removeprefix("torch."), seconds, flops_per_s)
    assert best is not None, "sizes must name at least one matrix size"
    return best


def measure_training(
    preset: str | MiniFusionConfig,
    *,
    batch_size: int,
    seq_len: int,
    steps: int = 3,
    warmup_steps: int = 1,
    device: str | torch.device = "cpu",
) -> TrainingMeasurement:
    """Median seconds per optimizer step of ``preset`` on random tokens, after ``warmup_steps``.

    Each step is the one :class:`minifusion.training.Trainer` takes, without its logging:
    forward + loss under the device's autocast, backward, gradient clipping to 1, AdamW (the
    package's two parameter groups), and the MoE routers' bias update. Random tokens cost the
    same as real ones; with MoE they spread over the experts as a balanced router would.
    """
    device = torch.device(device)
    name, config = _config_for(preset, seq_len)
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(config).to(device).train()
    train_config = TrainConfig(batch_size=batch_size, block_size=seq_len)
    optimizer = build_optimizer(model, train_config)
    dtype = autocast_dtype("auto", device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            loss = compute_loss(model, inputs, targets).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _update_moe_bias(model)

    for _ in range(warmup_steps):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return TrainingMeasurement(
        preset=name,
        parameters=config.estimate_parameters(),
        batch_size=batch_size,
        seq_len=seq_len,
        precision=str(dtype or torch.float32).removeprefix("torch."),
        steps=steps,
        seconds_per_step=statistics.median(times),
        flops_per_token=config.estimate_flops_per_token(seq_len),
    )


def _config_for(preset: str | MiniFusionConfig, seq_len: int) -> tuple[str, MiniFusionConfig]:
    """The preset's config, with room for ``seq_len`` positions."""
    if isinstance(preset, MiniFusionConfig):
        return "custom", preset
    config = MiniFusionConfig.from_preset(preset)
    if config.max_position_embeddings < seq_len:
        config = MiniFusionConfig.from_preset(preset, max_position_embeddings=seq_len)
    return preset, config


def _update_moe_bias(model: torch.nn.Module) -> None:
    """What the Trainer does after a step: aux-loss-free routers nudge their expert bias."""
    for module in model.modules():
        if isinstance(module, MoE):
            if module.router.use_bias:
                module.update_expert_bias()
            else:
                module.load_since_update.zero_()


def default_shapes(device: torch.device) -> dict[str, tuple[int, int]]:
    """``{preset: (batch size, sequence length)}`` sized for ``device``."""
    return dict(GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)


def run(
    shapes: dict[str, tuple[int, int]] | None = None,
    *,
    matmul_sizes: tuple[int, ...] = DEFAULT_MATMUL_SIZES,
    matmul_repeats: int = 3,
    steps: int = 3,
    warmup_steps: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[MatmulPeak, list[TrainingMeasurement]]:
    """The matmul peak, then every preset of ``shapes`` (``{preset: (batch, length)}``)."""
    device = torch.device(device)
    shapes = default_shapes(device) if shapes is None else shapes
    peak = measure_matmul_peak(matmul_sizes, repeats=matmul_repeats, device=device)
    results = [
        measure_training(
            preset, batch_size=b, seq_len=t, steps=steps, warmup_steps=warmup_steps, device=device
        )
        for preset, (b, t) in shapes.items()
    ]
    return peak, results


def format_table(peak: MatmulPeak, results: list[TrainingMeasurement]) -> str:
    """The peak row, then one row per preset with tokens/s, model FLOP/s and MFU."""
    lines = [
        "| run | parameters | dtype | batch × length | ms per step | tokens/s "
        "| GFLOP/s (3 × forward) | MFU |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense matmul peak, n = {peak.size} | — | {peak.dtype} | — "
        f"| {peak.seconds * 1e3:.2f} | — | {peak.flops_per_s / 1e9:.1f} | 100 % |",
    ]
    for m in results:
        lines.append(
            f"| {m.preset} | {m.parameters / 1e6:.2f} M | {m.precision} "
            f"| {m.batch_size} × {m.seq_len} | {m.seconds_per_step * 1e3:.0f} "
            f"| {m.tokens_per_s:,.0f} | {m.model_flops_per_s / 1e9:.1f} "
            f"| {100 * m.model_flops_per_s / peak.flops_per_s:.1f} % |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md and its README headline (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def _training_objects(data: Data) -> tuple[MatmulPeak, list[TrainingMeasurement]]:
    return (
        MatmulPeak(**data["peak"]),
        [TrainingMeasurement(**m) for m in data["runs"]],
    )


def training_table(per_device: PerDevice) -> str:
    columns = ["dtype", "batch × length", "tokens/s", "GFLOP/s", "MFU"]
    cells: dict[str, dict[str, list[str]]] = {}
    for device, data in per_device.items():
        peak, runs = _training_objects(data)
        rows = {
            "dense matmul peak": [peak.dtype, f"n = {peak.size}", MISSING,
                                  f"{peak.flops_per_s / 1e9:.1f}", "100 %"],
        }  # fmt: skip
        for m in runs:
            rows[m.preset] = [
                m.precision,
                f"{m.batch_size} × {m.seq_len}",
                f"{m.tokens_per_s:,.0f}",
                f"{m.model_flops_per_s / 1e9:.1f}",
                f"{100 * mfu(m.flops_per_token, m.tokens_per_s, peak.flops_per_s):.1f} %",
            ]
        cells[device] = rows
    return grouped_table("run", columns, cells)


def training_reading(data: Data) -> str:
    peak, runs = _training_objects(data)
    parts = [
        f"{m.preset} trains at {m.tokens_per_s:,.0f} tokens/s, "
        f"{100 * mfu(m.flops_per_token, m.tokens_per_s, peak.flops_per_s):.1f} % MFU"
        for m in runs
    ]
    return (
        "; ".join(parts)
        + f" (peak: {peak.flops_per_s / 1e9:.1f} GFLOP/s in {peak.dtype}, n = {peak.size})."
    )


def training_detail(data: Data) -> str:
    return format_table(*_training_objects(data))


def _headline_training(data: Data, preset: str) -> str | None:
    peak, runs = _training_objects(data)
    for m in runs:
        if m.preset == preset:
            share = mfu(m.flops_per_token, m.tokens_per_s, peak.flops_per_s)
            return f"{m.tokens_per_s:,.0f} ({100 * share:.1f} %)"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--presets", nargs="+", help="default: tiny and small")
    parser.add_argument("--batch-size", type=positive_int, help="default: per preset and device")
    parser.add_argument("--seq-len", type=positive_int, help="default: per preset and device")
    parser.add_argument("--matmul-sizes", type=positive_int, nargs="+",
                        default=list(DEFAULT_MATMUL_SIZES))
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--warmup-steps", type=non_negative_int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = default_shapes(device)
    shapes = {}
    for preset in args.presets or defaults:
        batch_size, seq_len = defaults.get(preset, (8, 256))
        shapes[preset] = (args.batch_size or batch_size, args.seq_len or seq_len)
    print(
        f"Training throughput on {device}: {args.warmup_steps} warm-up steps, then the median of "
        f"{args.steps}; random tokens. MFU = 3 × forward FLOPs/token × tokens/s ÷ the dense "
        "matmul peak measured just before."
    )
    started = time.perf_counter()
    peak, results = run(
        shapes,
        matmul_sizes=tuple(args.matmul_sizes),
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        device=device,
    )
    print(format_table(peak, results))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
