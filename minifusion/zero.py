"""Chapter 14 — ZeRO by the numbers: what each GPU holds, and the DeepSpeed config we pass.

Data parallelism gives every GPU a full copy of the model and a different slice of the batch.
The copies are what runs out of memory first: for AdamW each parameter drags along its gradient
and two optimizer moments. **ZeRO** (Rajbhandari et al., 2020, *ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models*) removes the redundancy in three stages:

* stage 1 shards the **optimizer state** over the ``G`` GPUs,
* stage 2 also shards the **gradients**,
* stage 3 also shards the **parameters** (gathered layer by layer when needed).

MiniFusion trains with fp32 parameters — which keeps Mamba's ``A_log``, ``D`` and ``dt_proj`` in
fp32 as chapter 09 requires — and computes in bf16 under autocast. Plain data parallelism
(stage 0) then holds 16 bytes per parameter: 4 of weights, 4 of gradient, 8 of AdamW moments.
DeepSpeed's ZeRO optimizer holds more. It does not update our fp32 weights in place: it keeps
its own fp32 **master** partition (``single_partition_of_fp32_groups``, a clone of this GPU's
share of the weights even when they already are fp32 — what a checkpoint's ``*_optim_states.pt``
shard holds, next to the moments), and at every step it copies the gradient partition into a new
fp32 tensor for AdamW. On one GPU that is 24 bytes per parameter. :func:`bytes_per_parameter`
gives each stage's bytes, read off DeepSpeed 0.19.8's code and checked against its estimators and
live engines (``tests/test_zero.py``); :func:`memory_per_gpu` multiplies them out and adds the
activations, which :func:`activation_bytes_per_token` *measures* on a real layer rather than
estimating.

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
    "MemoryEstimate",
    "activation_bytes_per_token",
    "bytes_per_parameter",
    "deepspeed_config",
    "memory_per_gpu",
]

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
def bytes_per_parameter(stage: int, gpus: int, *, weight_bytes: int = 4) -> dict[str, float]:
    """Bytes one GPU holds per model parameter under ZeRO ``stage`` on ``gpus`` GPUs.

    ``weight_bytes`` is the size of the weights the model computes with: 4 for MiniFusion's fp32
    parameters, 2 for 16-bit ones (DeepSpeed's ``bf16``/``fp16`` modes with its default
    ``grad_accum_dtype``, the weights' own — what its estimators assume). Returns the bytes of
    ``parameters``, ``gradients``, ``master`` (fp32 master weights) and ``optimizer`` (AdamW's two
    fp32 moments). With ``w = weight_bytes`` and ``G = gpus``::

        part          stage 0   stage 1            stage 2    stage 3
        parameters       4      w                  w          w/G
        gradients        4      max(w, (w+4)/G)    (w+4)/G    (w+4)/G
        master           0      4/G                4/G        4/G
        optimizer        8      8/G                8/G        8/G
        total, w = 4    16      4+max(4,8/G)+12/G  4 + 20/G   24/G     (24 on one GPU)
        total, w = 2     —      2+max(2,6/G)+12/G  2 + 18/G   20/G     (20 on one GPU)

    Stage 0 is plain data parallelism on our fp32 weights: AdamW updates them in place. Stages
    1–3 are DeepSpeed's ZeRO optimizers (``runtime/zero/stage_1_and_2.py``,
    ``runtime/zero/stage3.py``); the comments below name the tensors. The gradients count at the
    larger of two points in time: the end of the backward pass, and the step, when this GPU's
    share of the gradients and their fp32 copy for AdamW exist together. For 16-bit weights
    stage 2 is DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (``2Ψ + 18Ψ/G``); its
    stage-3 estimate counts ``18Ψ/G`` (plus the largest layer), ``2Ψ/G`` fewer than its code
    holds.

    Not counted, and the reason to leave headroom: the gradient buckets of the backward pass
    (``reduce_bucket_size`` numbers each, one per gradient dtype — bf16 and fp32 under our
    autocast — and two of each in stages 1–2 with ``overlap_comm``: 3.7 GiB with ``zero1.json``,
    which keeps DeepSpeed's default of 5·10⁸, 0.75 GiB with ``zero2.json``, 0.28 GiB with
    ``zero3.json``), stage 3's gathered parameters (the layers being computed and prefetched, and
    those below ``stage3_param_persistence_threshold``, kept whole), copies that live for a
    moment (16-bit gradients flattened before their conversion to fp32, AdamW's temporaries) and
    the allocator's fragmentation. The fp32 gradient copy is made one optimizer group at a time,
    so the table slightly overstates it (MiniFusion's undecayed group is 3 % of the 1.5B model).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}.")
    if gpus < 1:
        raise ValueError(f"gpus must be ≥ 1, got {gpus}.")
    if weight_bytes not in (2, 4):
        raise ValueError(f"weight_bytes must be 4 (fp32) or 2 (bf16/fp16), got {weight_bytes}.")
    w, share = weight_bytes, 1 / gpus
    if stage == 0:
        if w != 4:
            raise ValueError("stage 0 (plain data parallelism) is modelled for fp32 weights only.")
        return {"parameters": 4.0, "gradients": 4.0, "master": 0.0, "optimizer": 8.0}
    # The weights the forward pass uses. Stages 1-2: ``bit16_groups_flat``, whole on every GPU
    # (the parameters are views into it); stage 3: ``lp_param_buffer``, this GPU's partition.
    parameters = w * share if stage == 3 else w
    # The gradients backward leaves, in the weights' dtype. Stage 1 keeps every ``param.grad``
    # until they are reduced at the end of the backward pass, then only its share
    # (``averaged_gradients``; ``_clear_param_grad_only`` frees the rest). Stage 2
    # (``partition_gradients``) reduces bucket by bucket during the backward pass and keeps only
    # its share (``grads_in_partition``); stage 3 keeps it in ``grad_partitions_flat_buffer``.
    after_backward = w if stage == 1 else w * share
    # At ``step()`` the share is flattened into a new fp32 tensor before the share is freed:
    # ``single_partition_of_fp32_groups[i].grad`` (stages 1-2), ``fp32_partitioned_groups_flat
    # [i].grad`` (stage 3, ``_prepare_fp32_grad_for_sub_group``). With fp32 weights the flatten
    # is that copy; with 16-bit ones a 16-bit copy comes first and is dropped at once (not counted).
    at_step = (w + 4) * share
    return {
        "parameters": parameters,
        "gradients": max(after_backward, at_step),
        # ``single_partition_of_fp32_groups`` (stages 1-2: ``.detach().clone()`` of the share) and
        # ``fp32_partitioned_groups_flat`` (stage 3). Stage 3's ``_create_fp32_partitions`` means
        # to reuse a partition that is already fp32, but it compares ``tensor.device`` (a
        # torch.device) with ``self.device`` (a string such as "cuda:0"), which never compare
        # equal (torch 2.13), so it clones there too.
        "master": 4 * share,
        # AdamW's ``exp_avg`` and ``exp_avg_sq``, fp32, for the master partition only.
        "optimizer": 8 * share,
    }


@dataclass
class MemoryEstimate:
    """Bytes one GPU holds for training (model states + activations of one micro-batch)."""

    preset: str
    stage: int
    gpus: int
    parameters: float
    gradients: float
    master: float
    optimizer: float
    activations: float
    activation_checkpointing: bool

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.master + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    def row(self) -> str:
        gib = 2**30
        return (
            f"{self.preset:<16} ZeRO-{self.stage} × {self.gpus:<3} "
            f"params {self.parameters / gib:6.2f}  grads {self.gradients / gib:6.2f}  "
            f"master {self.master / gib:6.2f}  optim {self.optimizer / gib:6.2f}  "
            f"activations {self.activations / gib:6.2f}"
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

    Model states are :func:`bytes_per_parameter` (fp32 weights) times the parameter count.
    Activations are for one micro-batch of ``batch_size × seq_len`` tokens on each GPU (ZeRO
    does not shard them): every layer's saved tensors, or — with activation checkpointing — each
    layer's input plus one layer's saved tensors while it is recomputed. ``activation_bytes``
    (per token, all layers) defaults to :func:`activation_bytes_per_token`. The parts are added
    up although the activations peak at the end of the forward pass and the gradients later,
    which errs on the safe side; temporary buffers (see :func:`bytes_per_parameter`), the
    allocator's fragmentation and the CUDA context come on top: leave 10–20 % headroom.
    """
    n = config.estimate_parameters()
    states = {part: n * size for part, size in bytes_per_parameter(stage, gpus).items()}
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
    checkpoint_branches: bool = False,
) -> float:
    """Bytes autograd keeps for backward, per token, averaged over the model's layers.

    ``checkpoint_branches``: with branch-selective checkpointing on (the attention and Mamba
    branches keep only their inputs; :meth:`~minifusion.model.MiniFusionPreTrainedModel.
    checkpoint_branches`), measured the same way.

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
        layer.checkpoint_branches = checkpoint_branches
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
    for flag, value in (("--gpus", args.gpus), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len)):  # fmt: skip
        if value < 1:
            parser.error(f"{flag} must be ≥ 1, not {value}.")
    try:
        config = MiniFusionConfig.from_preset(args.preset)
    except (ValueError, FileNotFoundError) as error:  # an unknown preset, a bad value in one
        parser.error(str(error))
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
