"""Chapter 14 — ZeRO by the numbers: what each GPU holds, and the DeepSpeed config we pass.

Data parallelism gives every GPU a full copy of the model and a different slice of the batch.
The copies are what runs out of memory first: for AdamW each parameter drags along its gradient
and two optimizer moments. **ZeRO** (Rajbhandari et al., 2020, *ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models*) removes the redundancy in three stages:

* stage 1 shards the **optimizer state** over the ``G`` GPUs,
* stage 2 also shards the **gradients**,
* stage 3 also shards the **parameters** (gathered layer by layer when needed).

MiniFusion trains with fp32 parameters — they double as the master weights, which keeps
Mamba's ``A_log``, ``D`` and ``dt_proj`` in fp32 as chapter 09 requires — and computes in bf16
under autocast. Per parameter that is 4 bytes of weights, 4 of gradient and 8 of AdamW moments,
16 bytes in all (the same total as "bf16 weights + fp32 master copy" schemes; only how it splits
differs). :func:`memory_per_gpu` divides them as each stage does and adds the activations,
which :func:`activation_bytes_per_token` *measures* on a real layer rather than estimating.

:func:`deepspeed_config` turns one of ``configs/deepspeed/zero*.json`` plus the run's
``TrainConfig`` into the dictionary DeepSpeed receives. Batch size, gradient accumulation and
clipping come from ``TrainConfig`` only; a JSON file that sets them too is refused, so there is
never a second, silently different source of truth.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import MiniFusionConfig

__all__ = [
    "BYTES_PER_PARAMETER",
    "MemoryEstimate",
    "activation_bytes_per_token",
    "deepspeed_config",
    "memory_per_gpu",
]

#: fp32 weights, fp32 gradients, AdamW's two fp32 moments.
BYTES_PER_PARAMETER = {"parameters": 4, "gradients": 4, "optimizer": 8}
# Keys that TrainConfig owns; a DeepSpeed JSON may leave them out or say "auto".
_OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.batch_size × train.grad_accum_steps × GPUs",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "minifusion.training.build_optimizer (train.lr, weight_decay, beta1/2, eps)",
    "scheduler": "minifusion.training.build_scheduler (train.warmup_steps, min_lr_ratio)",
    "bf16": "train.precision (MiniFusion uses torch_autocast with fp32 master weights)",
    "fp16": "train.precision (MiniFusion uses torch_autocast with fp32 master weights)",
}


# ----------------------------------------------------------------------------------------------
# The DeepSpeed config
# ----------------------------------------------------------------------------------------------
def deepspeed_config(
    source: str | Path | dict[str, Any],
    train_config,
    *,
    world_size: int,
    autocast_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """The dictionary for ``deepspeed.initialize(config=...)``.

    Args:
        source: a JSON file (``configs/deepspeed/zero2.json``) or an already-parsed dict. It
            sets the ZeRO stage and its tuning knobs; anything ``TrainConfig`` owns must be
            absent or ``"auto"``.
        train_config: the run's ``TrainConfig`` (batch size, accumulation, clipping).
        world_size: number of processes (GPUs).
        autocast_dtype: ``torch.bfloat16`` to compute in bf16 under autocast, ``None`` for fp32.

    Raises:
        ValueError: naming the key and the setting that owns it.
    """
    name = str(source) if not isinstance(source, dict) else "the DeepSpeed config"
    if isinstance(source, dict):
        config = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"DeepSpeed config {path} does not exist; use configs/deepspeed/zero1.json, "
                "zero2.json or zero3.json."
            )
        config = json.loads(path.read_text(encoding="utf-8"))
    for key, owner in _OWNED_KEYS.items():
        if key in config and config[key] != "auto":
            raise ValueError(
                f"{name} sets {key!r}, which MiniFusion sets from {owner}. Remove it from the "
                'JSON (or write "auto") and set it in the preset\'s train section or with '
                "--set, so there is one source of truth."
            )
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{name}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r}).")
    config = {k: v for k, v in config.items() if k not in _OWNED_KEYS}
    config.update(
        train_micro_batch_size_per_gpu=train_config.batch_size,
        gradient_accumulation_steps=train_config.grad_accum_steps,
        train_batch_size=train_config.batch_size * train_config.grad_accum_steps * world_size,
        gradient_clipping=float(train_config.grad_clip),
    )
    autocast = dict(config.get("torch_autocast", {}))
    autocast["enabled"] = autocast_dtype is not None
    if autocast_dtype is not None:
        autocast["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[autocast_dtype]
    config["torch_autocast"] = autocast
    config.setdefault("steps_per_print", 2**31 - 1)  # our own logging reports progress
    config.setdefault("wall_clock_breakdown", False)
    return config


# ----------------------------------------------------------------------------------------------
# Memory per GPU
# ----------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes one GPU holds for training (model states + activations of one micro-batch)."""

    preset: str
    stage: int
    gpus: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    activation_checkpointing: bool

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    def row(self) -> str:
        gib = 2**30
        return (
            f"{self.preset:<16} ZeRO-{self.stage} × {self.gpus:<3} "
            f"params {self.parameters / gib:6.2f}  grads {self.gradients / gib:6.2f}  "
            f"optim {self.optimizer / gib:6.2f}  activations {self.activations / gib:6.2f}"
            f"{' (ckpt)' if self.activation_checkpointing else '       '}  "
            f"total {self.total / gib:6.2f} GiB"
        )


def memory_per_gpu(
    config: MiniFusionConfig,
    *,
    stage: int,
    gpus: int,
    batch_size: int,
    seq_len: int,
    activation_checkpointing: bool = False,
    activation_bytes: float | None = None,
    preset: str = "",
) -> MemoryEstimate:
    """Training memory per GPU for ``config`` under ZeRO ``stage`` on ``gpus`` GPUs.

    Model states follow :data:`BYTES_PER_PARAMETER`, divided by ``gpus`` for the parts the
    stage shards. Activations are for one micro-batch of ``batch_size × seq_len`` tokens on each
    GPU (ZeRO does not shard them): every layer's saved tensors, or — with activation
    checkpointing — each layer's input plus one layer's saved tensors while it is recomputed.
    ``activation_bytes`` (per token, all layers) defaults to :func:`activation_bytes_per_token`.
    Temporary buffers (communication buckets, the allocator's fragmentation, the CUDA context)
    come on top; leave 10–20 % headroom.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}.")
    if gpus < 1:
        raise ValueError(f"gpus must be ≥ 1, got {gpus}.")
    n = config.estimate_parameters()
    shard = {"parameters": stage >= 3, "gradients": stage >= 2, "optimizer": stage >= 1}
    states = {
        part: n * BYTES_PER_PARAMETER[part] / (gpus if shard[part] else 1)
        for part in BYTES_PER_PARAMETER
    }
    tokens = batch_size * seq_len
    if activation_bytes is None:
        per_layer = activation_bytes_per_token(config, seq_len=min(seq_len, 512))
    else:
        per_layer = activation_bytes / config.num_hidden_layers
    layers = config.num_hidden_layers
    if activation_checkpointing:
        residual = 4 * config.hidden_size  # each layer's fp32 input is kept
        activations = tokens * (layers * residual + per_layer)
    else:
        activations = tokens * layers * per_layer
    return MemoryEstimate(
        preset=preset,
        stage=stage,
        gpus=gpus,
        activations=activations,
        activation_checkpointing=activation_checkpointing,
        **states,
    )


def activation_bytes_per_token(
    config: MiniFusionConfig,
    *,
    seq_len: int = 256,
    dtype: torch.dtype | None = torch.bfloat16,
) -> float:
    """Bytes autograd keeps for backward, per token, averaged over the model's layers.

    Measured, not estimated: one layer of each distinct (mixer, FFN) kind in ``config`` runs a
    forward pass on the CPU under ``dtype`` autocast while a ``saved_tensors_hooks`` pair adds
    up the bytes of every tensor autograd saves (each storage once). The pass runs at ``seq_len``
    and ``2·seq_len`` tokens and the difference is divided by ``seq_len``: what does not grow
    with the batch (autocast's bf16 copies of the weights) cancels out. Attention's cost per
    token grows with length unless the kernel is fused, so the figure holds near ``seq_len``.
    """
    from .model import MiniFusionDecoderLayer
    from .rope import RotaryEmbedding

    pairs = list(zip(config.mixer_types, config.ffn_types))
    rotary = RotaryEmbedding(config)
    total = 0.0
    for kind in dict.fromkeys(pairs):  # each distinct kind once, in order
        layer = MiniFusionDecoderLayer(config, pairs.index(kind)).train()
        short = _saved_bytes(layer, rotary, seq_len, dtype)
        long = _saved_bytes(layer, rotary, 2 * seq_len, dtype)
        total += pairs.count(kind) * (long - short) / seq_len
    return total / config.num_hidden_layers


def _saved_bytes(layer, rotary, seq_len: int, dtype: torch.dtype | None) -> int:
    """Bytes of the tensors autograd saves in one forward pass of ``layer`` on (1, seq_len)."""
    hidden = torch.randn(1, seq_len, layer.input_layernorm.weight.shape[0], requires_grad=True)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        layer(hidden, rotary(torch.arange(seq_len)[None]), None, None)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> int:
    """``python -m minifusion.zero --preset fusiontree-1.5b --gpus 8``: the memory table."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m minifusion.zero", description="Training memory per GPU by ZeRO stage."
    )
    parser.add_argument("--preset", default="fusiontree-1.5b")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    config = MiniFusionConfig.from_preset(args.preset)
    per_token = activation_bytes_per_token(config, seq_len=min(args.seq_len, 512))
    print(
        f"{args.preset}: {config.estimate_parameters():,} parameters; micro-batch "
        f"{args.batch_size} × {args.seq_len} tokens per GPU; activations measured at "
        f"{per_token:,.0f} bytes per token per layer (bf16 autocast)"
    )
    for checkpointing in (False, True):
        for stage in (0, 1, 2, 3):
            estimate = memory_per_gpu(
                config, stage=stage, gpus=args.gpus, batch_size=args.batch_size,
                seq_len=args.seq_len, activation_checkpointing=checkpointing,
                activation_bytes=per_token * config.num_hidden_layers, preset=args.preset,
            )  # fmt: skip
            print(estimate.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
