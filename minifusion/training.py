"""Chapter 12 — the training loop on one device, readable top to bottom.

One optimisation step, in the order the code below runs it:

1. **Batches** come from the memory-mapped token file; batch ``n`` is a pure function of
   ``(seed, n)`` (:class:`BatchStream`), so a resumed run reads exactly what an uninterrupted
   run would have read.
2. **Forward + backward** under bf16 autocast where that is faster (CUDA), fp32 otherwise,
   ``grad_accum_steps`` micro-batches summed into one step (each loss divided by their number,
   so the gradient equals the gradient of one big batch).
3. **Guard**: a non-finite loss or gradient norm skips the step (the optimizer never sees it);
   ``max_bad_steps`` such steps in a row stop the run with an explanation.
4. **Clip** the gradient's global norm to ``grad_clip``.
5. **AdamW** with two parameter groups — weight decay on matrices, none on norms, biases,
   embeddings (by choice) and Mamba's ``A_log``, ``D``, ``dt_proj.bias`` — and a learning rate
   that warms up linearly, then follows a cosine down to ``min_lr_ratio · lr``.
6. **Measure**: loss, learning rate, tokens/s, gate and MoE statistics go to ``metrics.jsonl``,
   TensorBoard and the progress bar; every ``eval_every`` steps the validation loss, bits per
   character, a loss-curve PNG and a sample text; every ``save_every`` steps a checkpoint.

The :class:`Trainer` owns the state a checkpoint must hold (chapter 13) and stops cleanly on
SIGTERM/SIGINT: it finishes the step in progress, saves, and returns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (
    capture_rng_state,
    check_compatible,
    export_pretrained,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import TokenBlocks, TokenFile
from .fusion import GatedFusion
from .moe import MoE
from .monitor import GateMonitor, not_recorded, plot_gate_heatmaps
from .tokenizer import tokenizer_hash

__all__ = [
    "BatchStream",
    "EvalResult",
    "LossParts",
    "MetricsLog",
    "StreamingBatches",
    "TrainConfig",
    "TrainingDivergedError",
    "Trainer",
    "TrainResult",
    "ValidationSet",
    "autocast_dtype",
    "build_optimizer",
    "build_scheduler",
    "compute_loss",
    "evaluate",
    "generate_sample",
    "validation_sums",
    "model_statistics",
    "parameter_groups",
    "plot_loss_curve",
    "warmup_cosine",
]


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

@dataclass
class TrainConfig:
    """Every training setting, with the defaults ``make train`` uses for the ``tiny`` preset.

    A preset's ``train:`` section sets any of these; ``--set train.<name>=<value>`` overrides.
    """

    # What one optimizer step sees: batch_size × grad_accum_steps × block_size tokens.
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches summed into one step
    block_size: int = 256  # tokens per sequence (the data section's block_size by default)
    max_steps: int = 200
    # AdamW and the schedule
    lr: float = 3e-3  # peak learning rate, reached after warmup_steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # embeddings (and the tied head) usually get no decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 switches clipping off
    # auto: bf16 on CUDA GPUs that have it, fp16 with loss scaling on older ones (T4, V100),
    # fp32 on CPU (measured in chapter 12) | bf16 | fp16 | fp32
    precision: str = "auto"
    tf32: bool = False  # fp32 matmuls on CUDA tensor cores (Ampere and newer): ~10-bit mantissa
    # torch.compile the model (nn.Module.compile: state-dict names unchanged); the first step
    # compiles for a while. Mamba layers run slower compiled on CPU today: the fused scan is a
    # pybind call, where the compiled graph breaks into pieces.
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # Recompute activations in backward: False (off), True or "layers" (whole layers: least
    # memory, ~⅓ more compute) or "branches" (only the attention and Mamba branches, chapter 12).
    gradient_checkpointing: bool | str = False
    seed: int = 0
    # Measuring
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 50  # steps between evaluations (and the last step always)
    eval_batches: int = 8  # validation batches per periodic evaluation (the final one uses all)
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 60
    sample_temperature: float = 0.8
    tensorboard: bool = True
    # Never losing work
    save_every: int = 100  # steps between checkpoints (and the last step always)
    keep_last: int = 3  # checkpoints kept on disk
    max_bad_steps: int = 5  # non-finite steps in a row before giving up

    def __post_init__(self) -> None:
        try:  # True → "layers" (the one spelling the trainer and the checkpoints see)
            self.gradient_checkpointing = checkpointing_mode(self.gradient_checkpointing)
        except ValueError:
            pass  # validate() names the allowed values

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Build from a mapping, refusing unknown names and converting YAML strings like 3e-3."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown train setting(s) {unknown}. Valid names: {sorted(known)}.")
        converted = {}
        for name, value in values.items():
            kind = type(getattr(cls(), name))
            try:
                if name == "gradient_checkpointing":
                    converted[name] = checkpointing_mode(value)
                    continue
                converted[name] = _convert(value, kind)
            except (TypeError, ValueError):
                expected = f"a valid {kind.__name__}"
                if name == "gradient_checkpointing":
                    expected = "false, true (= 'layers') or 'branches'"
                raise ValueError(f"train.{name}={value!r} is not {expected}.") from None
        config = cls(**converted)
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be ≥ 1"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be ≥ 1"),
            (self.block_size >= 1, "block_size must be ≥ 1"),
            (self.max_steps >= 1, "max_steps must be ≥ 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]"),
            (self.grad_clip >= 0, "grad_clip must be ≥ 0 (0 switches clipping off)"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (
                min(self.log_every, self.eval_every, self.save_every) >= 1,
                "log_every, eval_every and save_every must be ≥ 1",
            ),  # fmt: skip
            (self.eval_batches >= 1, "eval_batches must be ≥ 1"),
            (self.keep_last >= 1, "keep_last must be ≥ 1"),
            (self.max_bad_steps >= 1, "max_bad_steps must be ≥ 1"),
            (
                self.gradient_checkpointing in CHECKPOINTING_MODES,
                "gradient_checkpointing must be false, true (= 'layers') or 'branches'",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid training setting: {message}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.block_size


CHECKPOINTING_MODES = (False, "layers", "branches")


def checkpointing_mode(value: Any) -> bool | str:
    """``train.gradient_checkpointing`` as False, ``"layers"`` or ``"branches"``: ``True`` (and
    YAML's ``true``/``yes``) means whole layers, as it did before branches were an option."""
    text = str(value).lower()
    if value is False or text in ("false", "0", "no", "off", "none"):
        return False
    if value is True or text in ("true", "1", "yes", "on", "layers"):
        return "layers"
    if text == "branches":
        return "branches"
    raise ValueError(value)


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(float(value)) if kind is int and isinstance(value, str) else kind(value)


# ----------------------------------------------------------------------------------------------
# The optimizer: two parameter groups, and the learning-rate schedule
# ----------------------------------------------------------------------------------------------
def parameter_groups(
    model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Split parameters into a decayed and an undecayed group for AdamW.

    Weight decay pulls weights toward zero. That regularises matrices, but it would drag norm
    gains (ideally near 1), biases and Mamba's ``A_log``/``D``/``dt_proj.bias`` (which set
    time constants) away from where they belong, so those get none. Embeddings get none
    unless ``decay_embeddings`` — rare tokens are seen too seldom to fight the decay back.

    Each group carries ``group_name`` and ``param_names`` for inspection.
    """
    embedding_ids = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # tied weights appear once
        seen.add(id(param))
        skip = (
            param.ndim < 2
            or getattr(param, "_no_weight_decay", False)
            or (id(param) in embedding_ids and not decay_embeddings)
        )
        (no_decay if skip else decay).append((name, param))
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay],
         "weight_decay": weight_decay, "group_name": "decay"},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
         "weight_decay": 0.0, "group_name": "no_decay"},
    ]  # fmt: skip


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, config.weight_decay, decay_embeddings=config.decay_embeddings)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier used *for* optimizer step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps (Adam's
    second-moment estimates are poor at first, so early steps are kept small), then half a
    cosine from 1 down to ``min_lr_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(max_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# The settings a resumed run takes from its own config rather than from the checkpoint.
OPTIMIZER_SETTINGS = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay",
                      "beta1", "beta2", "eps")  # fmt: skip


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = _ScheduleMultiplier(config.warmup_steps, config.max_steps, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class _ScheduleMultiplier:
    """``warmup_cosine`` as a callable object, so the scheduler's state stays plain data."""

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return warmup_cosine(
            step,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
            min_lr_ratio=self.min_lr_ratio,
        )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32).

    ``auto`` is bf16 on CUDA GPUs that support it, fp16 on CUDA GPUs that do not (T4, V100:
    their tensor cores run fp16, and fp32 would leave them idle; training then needs loss
    scaling, see :func:`grad_scaler`) and fp32 elsewhere: on CPUs without native bf16 matrix
    units autocast only adds conversions (chapter 12 measures it).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 training, ``None`` for every other dtype.

    fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by a
    large scale (2¹⁶ to start) lifts them into range; the optimizer sees them divided back. When
    a scaled gradient overflows to inf, that step is skipped and the scale halved; after 2,000
    good steps in a row it doubles again. bf16 has fp32's exponent range and needs none.
    """
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def use_tf32(enabled: bool) -> None:
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores (Ampere and newer).

    TF32 keeps fp32's range with a 10-bit mantissa (about 3 decimal digits, like fp16) for the
    products, accumulating in fp32: several times faster for fp32 training, with no effect on
    CPUs or on the bf16/fp16 parts of a mixed-precision run.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Data: resumable batches
# ----------------------------------------------------------------------------------------------
class BatchStream:
    """Training batches drawn from a token file, resumable at any position.

    Example ``k`` (counted from the start of training) is a block at a random offset drawn from
    ``(seed, epoch, k mod n)`` where ``n`` is the number of blocks per pass over the file. The
    only state is ``position`` — the number of examples consumed — so saving that one integer
    is enough to continue exactly. With several processes, rank ``r`` of ``world_size`` takes
    every ``world_size``-th batch-sized slice, so ranks never read the same example.
    """

    def __init__(
        self,
        token_file: TokenFile | str | Path,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.position, self.rank, self.world_size = position, rank, world_size
        self._epoch_blocks: dict[int, TokenBlocks] = {}
        self.examples_per_epoch = len(self._blocks(0))

    def _blocks(self, epoch: int) -> TokenBlocks:
        if epoch not in self._epoch_blocks:
            self._epoch_blocks = {  # keep one epoch: each holds only its seed
                epoch: TokenBlocks(
                    self.file, self.block_size, mode="random", seed=self.seed * 1_000_003 + epoch
                )
            }
        return self._epoch_blocks[epoch]

    def example(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(k, self.examples_per_epoch)
        return self._blocks(epoch)[index]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(batch_size, block_size)`` int64."""
        start = self.position + self.rank * self.batch_size
        pairs = [self.example(k) for k in range(start, start + self.batch_size)]
        self.position += self.batch_size * self.world_size
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    @property
    def epoch(self) -> float:
        return self.position / self.examples_per_epoch


class StreamingBatches:
    """Training batches packed on the fly from a streamed corpus — for data too big to tokenise.

    The same interface as :class:`BatchStream` (``next_batch()``, ``position``, ``rank``,
    ``world_size``, ``epoch``), fed by :class:`~minifusion.data.StreamingBlocks`: documents are
    read in order, tokenised, packed into blocks, and split between ranks by
    ``datasets.distributed.split_dataset_by_node`` (whole files or shards per rank when their
    number divides evenly, otherwise every ``world_size``-th document). A rank that reaches the
    end of its share starts it again.

    ``position`` counts examples consumed by all ranks together, as in :class:`BatchStream`. A
    stream cannot jump, so resuming at ``position`` re-reads and discards the first
    ``position / world_size`` blocks of this rank's share: exact at the same world size, and
    close to where the run was (not the same blocks) at another one.

    Args:
        documents: an iterable ``datasets.IterableDataset`` with a ``text`` column (for example
            :meth:`~minifusion.data.PreparedStream.training_documents`).
        tokenizer: the run's tokenizer.
        block_size, batch_size: as for :class:`BatchStream`.
    """

    def __init__(
        self,
        documents,
        tokenizer,
        block_size: int,
        batch_size: int,
        *,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.documents, self.tokenizer = documents, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.position, self.rank, self.world_size = position, rank, world_size
        self.completed_passes = 0
        self._examples: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._expected: tuple[int, int, int] | None = None  # (position, rank, world_size)

    def _endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from .data import StreamingBlocks

        self.completed_passes = 0
        while True:
            blocks = StreamingBlocks(self.documents, self.tokenizer, self.block_size,
                                     rank=self.rank, world_size=self.world_size)  # fmt: skip
            empty = True
            for pair in blocks:
                empty = False
                yield pair
            if empty:
                raise ValueError(
                    f"Rank {self.rank} of {self.world_size} got no complete block of "
                    f"{self.block_size + 1} tokens from its share of the stream. Use more or "
                    "longer documents, a smaller block_size, or fewer processes."
                )
            self.completed_passes += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(batch_size, block_size)`` int64."""
        if self._expected != (self.position, self.rank, self.world_size):
            # First call, or position / rank changed from outside (a resume): start the stream
            # again and skip what this rank has already consumed.
            self._examples = self._endless()
            for _ in range(self.position // self.world_size):
                next(self._examples)
        pairs = [next(self._examples) for _ in range(self.batch_size)]
        self.position += self.batch_size * self.world_size
        self._expected = (self.position, self.rank, self.world_size)
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    @property
    def epoch(self) -> float:
        """Completed passes over this rank's share (the stream's length is not known ahead)."""
        return float(self.completed_passes)


# ----------------------------------------------------------------------------------------------
# The loss and the evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class LossParts:
    """The training objective and its parts (scalar tensors)."""

    total: torch.Tensor  # what backward() sees
    lm: torch.Tensor  # next-token cross-entropy in nats per token
    moe_aux: torch.Tensor
    gate_balance: torch.Tensor
    gate_entropy: torch.Tensor


def compute_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> LossParts:
    """Cross-entropy of ``model(inputs)`` against ``targets`` plus the model's auxiliary losses.

    ``targets`` are the inputs shifted by one (``TokenBlocks`` gives both), so every one of the
    ``B·T`` positions is scored; passing ``labels=inputs`` to the model would score ``T−1``.
    """
    out = model(input_ids=inputs)
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    total = lm + out.moe_aux_loss + out.gate_balance_loss + out.gate_entropy_loss
    return LossParts(total, lm, out.moe_aux_loss, out.gate_balance_loss, out.gate_entropy_loss)


@dataclass
class EvalResult:
    loss: float  # nats per token
    bpc: float  # bits per character
    tokens: int
    characters: int

    @classmethod
    def from_sums(cls, nats: float, tokens: int, characters: int) -> EvalResult:
        return cls(nats / tokens, nats / math.log(2) / characters, int(tokens), int(characters))

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


class ValidationSet:
    """Fixed validation blocks spread evenly over the validation file, with character counts.

    Bits per character divide the total loss in bits by the number of characters the scored
    tokens spell, so models with different tokenizers (or none) can be compared: a tokenizer
    with longer tokens has a higher loss per token but not per character. The end-of-text token
    counts as one character (it stands for a document break).
    """

    def __init__(self, token_file: TokenFile | str | Path, block_size: int, tokenizer):
        self.blocks = TokenBlocks(token_file, block_size, mode="sequential")
        self.tokenizer = tokenizer
        self._characters: dict[int, int] = {}  # block index → characters, filled on first use

    def characters_of(self, indices: list[int]) -> int:
        """Characters spelled by the targets of blocks ``indices`` (decoded once, then cached)."""
        missing = [i for i in indices if i not in self._characters]
        if missing:
            eos = self.tokenizer.eos_token_id
            targets = [self.blocks[i][1].tolist() for i in missing]
            texts = self.tokenizer.batch_decode(targets, skip_special_tokens=True)
            for i, text, ids in zip(missing, texts, targets):
                self._characters[i] = len(text) + ids.count(eos)
        return sum(self._characters[i] for i in indices)

    @property
    def characters(self) -> np.ndarray:
        """Characters per block for every block, ``(len(self),)``."""
        self.characters_of(list(range(len(self))))
        return np.array([self._characters[i] for i in range(len(self))], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.blocks)

    def indices(self, count: int | None) -> list[int]:
        """``count`` block indices spread evenly over the file (all blocks for ``None``)."""
        n = len(self.blocks)
        if count is None or count >= n:
            return list(range(n))
        return np.linspace(0, n - 1, count).round().astype(int).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    validation: ValidationSet,
    *,
    batch_size: int,
    max_blocks: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> EvalResult:
    """Validation loss (nats/token) and bits per character over ``max_blocks`` blocks."""
    indices = validation.indices(max_blocks)
    nats, tokens, characters = validation_sums(
        model, validation, indices, batch_size=batch_size, device=device, dtype=dtype
    )
    return EvalResult.from_sums(nats, tokens, characters)


@torch.no_grad()
def validation_sums(
    model: nn.Module,
    validation: ValidationSet,
    indices: list[int],
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    forward_passes: int | None = None,
) -> tuple[float, int, int]:
    """Summed loss (nats), target tokens and characters over the blocks ``indices``.

    ``forward_passes`` forces at least that many batches: a distributed rank with fewer blocks
    than the others runs extra, uncounted passes so every rank joins every collective.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_chars = 0.0, 0, 0
    batches = max(-(-len(indices) // batch_size), forward_passes or 0)
    for start in range(0, batches * batch_size, batch_size):
        chunk = indices[start : start + batch_size]
        pairs = [validation.blocks[i] for i in chunk or [0]]
        inputs = torch.stack([x for x, _ in pairs]).to(device)
        targets = torch.stack([y for _, y in pairs]).to(device)
        # a padding pass (no blocks left for this rank) scores nothing, so no gate statistics
        with _autocast(device, dtype), nullcontext() if chunk else not_recorded():
            logits = model(input_ids=inputs).logits
        if chunk:
            nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            total_nats += nats.item()
            total_tokens += int((targets != -100).sum())  # -100: not scored (fine-tuning prompts)
            total_chars += validation.characters_of(chunk)
    model.train(was_training)
    return total_nats, total_tokens, total_chars


def generate_sample(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """Sample a continuation of ``prompt`` without touching the training run's RNG streams."""
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.random.fork_rng(devices=[] if torch.device(device).type != "cuda" else None):
        torch.manual_seed(seed)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=50,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# Measurements: model statistics, metrics file, loss curve
# ----------------------------------------------------------------------------------------------
def model_statistics(model: nn.Module) -> dict[str, float]:
    """Gate and MoE statistics from the last forward pass, flat ``name: value`` pairs.

    * ``gate/layer{i}/mean``, ``gate/layer{i}/std``: the fusion gate ``g`` (1 = all Mamba,
      0 = all attention) over the batch, per hybrid layer.
    * ``moe/layer{i}/max_load``: the busiest expert's share of the routed tokens counted
      since the last optimizer step (1/E is perfect balance; 1 means collapse onto one expert).

    The gate entries describe the last forward pass only (one micro-batch); the Trainer's
    metrics replace them with its gate monitor's values for the whole step.
    """
    stats: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, GatedFusion) and module.keep is None:
            layer = _layer_index(name)
            stats[f"gate/layer{layer}/mean"] = float(module.gate_mean)
            stats[f"gate/layer{layer}/std"] = float(module.gate_std)
        elif isinstance(module, MoE):
            load = module.load_since_update
            if float(load.sum()) > 0:
                stats[f"moe/layer{_layer_index(name)}/max_load"] = float(load.max() / load.sum())
    return stats


def _layer_index(module_name: str) -> str:
    parts = module_name.split(".")
    return parts[parts.index("layers") + 1] if "layers" in parts else module_name


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

    Training lines have ``kind="train"``, ``step``, ``loss`` (cross-entropy, nats/token),
    ``lr``, ``tokens``; evaluation lines have ``kind="eval"`` and add ``val_loss`` and
    ``val_bpc``. Plain JSON lines can be read by anything: ``pandas.read_json(path,
    lines=True)``, ``jq``, or :meth:`read`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text("utf-8").splitlines() if line]

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step``: after a resume from ``step`` those steps are redone."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path | None = None):
    """Training and validation loss against tokens seen, plus validation bits per character.

    Returns the matplotlib ``Figure``; with ``path`` it is also written as a PNG. Uses the
    object-oriented API (no pyplot), so it works in scripts, threads and notebooks alike.
    """
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    loss_axes, bpc_axes = figure.subplots(1, 2)
    loss_axes.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
    loss_axes.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-",
                   label="validation")  # fmt: skip
    loss_axes.set(xlabel="tokens seen", ylabel="loss (nats / token)", title="Loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    bpc_axes.plot([r["tokens"] for r in evals], [r["val_bpc"] for r in evals], "o-", color="C1")
    bpc_axes.set(xlabel="tokens seen", ylabel="bits / character", title="Validation")
    bpc_axes.grid(alpha=0.3)
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


# ----------------------------------------------------------------------------------------------
# Stopping cleanly
# ----------------------------------------------------------------------------------------------
class TrainingDivergedError(RuntimeError):
    """Too many non-finite steps in a row."""


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

    The first signal only sets the flag (the step finishes, a checkpoint is saved, the run
    returns); the original handlers are put back at once, so a second Ctrl-C interrupts
    immediately for someone who really wants out.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def __bool__(self) -> bool:
        return self.signal_name is not None


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    tokens: int
    stopped_by: str  # "max_steps", "stop_at", or the signal's name
    checkpoint: Path | None
    final_eval: EvalResult | None = None
    export: Path | None = None
    seconds: float = 0.0
    skipped_steps: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train ``model`` on a token file, writing everything into ``out_dir``.

    ``out_dir`` receives ``metrics.jsonl``, ``tensorboard/``, ``loss_curve.png``,
    ``samples.txt``, ``checkpoints/step_NNNNNN/`` and, at the end, ``model/`` (a Hugging Face
    folder with safetensors). With ``resume=True`` the newest checkpoint in ``out_dir`` is
    loaded first (if there is one).

    Args:
        model: a ``MiniFusionForCausalLM`` (any model returning ``logits`` and the aux losses).
        tokenizer: the tokenizer the token files were made with.
        train_file, val_file: token files (``minifusion.data.prepare_data`` writes them).
        config: the training settings.
        out_dir: the run folder.
        batches: where training batches come from instead of ``train_file`` (which may then be
            ``None``) — a :class:`StreamingBatches` for a streamed corpus, instruction examples
            for fine-tuning (``minifusion.instruct``).
        validation: what the evaluations score instead of ``val_file`` (which may then be
            ``None``): anything with :class:`ValidationSet`'s ``blocks``/``indices``/
            ``characters_of``; targets of ``-100`` are not scored.
        progress: show a tqdm progress bar.
        verbose: print one line per evaluation (no timings, so notebook output is repeatable).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        train_file: str | Path | None,
        val_file: str | Path | None,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        resume: bool = True,
        progress: bool = True,
        verbose: bool = True,
        batches: BatchStream | StreamingBatches | None = None,
        validation: ValidationSet | None = None,
    ):
        config.validate()
        self.config, self.tokenizer = config, tokenizer
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = _resolve_device(config.device)
        self.dtype = autocast_dtype(config.precision, self.device)
        self.compute_dtype = self.dtype  # for reports (DeepSpeed's engine takes over autocast)
        self.scaler = grad_scaler(self.dtype, self.device)  # fp16 only
        if config.tf32:
            use_tf32(True)
        self.model = model.to(self.device).train()
        if config.compile:
            self.model.compile()
        checkpointing = checkpointing_mode(config.gradient_checkpointing)
        if checkpointing == "layers":
            # Non-reentrant checkpointing works with inputs that need no grad (our token ids).
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        elif checkpointing == "branches":
            self.model.checkpoint_branches()
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        self.progress, self.verbose = progress, verbose

        if batches is None:
            train_tokens = TokenFile(train_file, expected_tokenizer_hash=self.tokenizer_hash)
            batches = BatchStream(
                train_tokens, config.block_size, config.batch_size, seed=config.seed
            )
        self.batches = batches
        if validation is None:
            val_tokens = TokenFile(val_file, expected_tokenizer_hash=self.tokenizer_hash)
            validation = ValidationSet(val_tokens, config.block_size, tokenizer)
        self.validation = validation
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.checkpoint_dir = self.out_dir / "checkpoints"
        # per-layer gate statistics of the hybrid layers, per step and per evaluation (chapter 15)
        self.gate_monitor = GateMonitor(self.model)

        self.step = 0  # optimizer steps taken (skipped non-finite steps included)
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_steps_in_row = 0
        self.train_seconds = 0.0  # wall-clock time spent training, summed over resumes
        self.resumed_from: Path | None = None
        self.changed_on_resume: dict[str, tuple[Any, Any]] = {}
        self.last_sample: str | None = None
        self.is_main = True  # the process that writes logs (rank 0 when distributed)
        self._resume_or_start_fresh(resume)

    def _resume_or_start_fresh(self, resume: bool) -> None:
        if resume and (checkpoint := latest_checkpoint(self.checkpoint_dir)) is not None:
            self.load(checkpoint)
        elif self.is_main:  # a fresh run starts fresh logs (leftovers of a run that never saved)
            self.metrics.path.unlink(missing_ok=True)
            (self.out_dir / "samples.txt").unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)

    # ---------------------------------------------------------------- state for checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.batches.position,
            "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds,
            "rng": capture_rng_state(),
            "gate_monitor": self.gate_monitor.state_dict(),
            # fp16's loss scale (only then: other checkpoints keep their layout)
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.batches.position,
            "model_config": self.model.config.to_dict(),
            "tokenizer_hash": self.tokenizer_hash,
            "train_config": dataclasses.asdict(self.config),
            "torch_version": torch.__version__,
        }

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically; see chapter 13)."""
        return save_checkpoint(
            self.checkpoint_dir, self.state_dict(), self._meta(), keep_last=self.config.keep_last
        )

    def load(self, checkpoint: str | Path) -> None:
        """Continue from ``checkpoint`` exactly where it was saved."""
        state, meta = load_checkpoint(checkpoint, map_location=self.device)
        check_compatible(
            meta,
            model_config=self.model.config.to_dict(),
            tokenizer_hash=self.tokenizer_hash,
            where=f"Checkpoint {checkpoint}",
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_optimizer_settings(meta.get("train_config", {}))
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.batches.position = state["data_position"]
        self.skipped_steps = state["skipped_steps"]
        self.train_seconds = state["train_seconds"]
        if "gate_monitor" in state:  # checkpoints written before chapter 15 have no history
            self.gate_monitor.load_state_dict(state["gate_monitor"])
        if self.scaler is not None and state.get("grad_scaler"):  # the loss scale carries over
            self.scaler.load_state_dict(state["grad_scaler"])
        restore_rng_state(state["rng"])
        if self.is_main:
            self.metrics.truncate_after(self.step)
        self.resumed_from = Path(checkpoint)

    def apply_optimizer_settings(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """After a resume, make this run's optimizer and schedule settings the ones in force.

        A checkpoint carries the optimizer's hyperparameters inside its state (and the schedule
        inside the scheduler's), so loading it would silently bring back the old ones — a lower
        ``train.lr`` after a divergence would do nothing. Here the moments and step counts stay,
        the settings come from ``self.config``. ``saved``: the checkpoint's ``train_config``;
        returns the settings that changed, ``{name: (old, new)}``, also kept as
        ``changed_on_resume`` (the training script prints them).
        """
        config = self.config
        schedule = _ScheduleMultiplier(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        groups = self.optimizer.param_groups
        self.scheduler.lr_lambdas = [schedule] * len(groups)
        self.scheduler.base_lrs = [config.lr] * len(groups)
        for group in groups:
            group["initial_lr"] = config.lr
            group["lr"] = config.lr * schedule(self.scheduler.last_epoch)
            group["betas"] = (config.beta1, config.beta2)
            group["eps"] = config.eps
            if group.get("group_name") == "decay":
                group["weight_decay"] = config.weight_decay
        self.scheduler._last_lr = [group["lr"] for group in groups]
        changed = {
            name: (saved[name], getattr(config, name))
            for name in OPTIMIZER_SETTINGS
            if name in saved and saved[name] != getattr(config, name)
        }
        self.changed_on_resume = changed
        return changed

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its numbers."""
        config = self.config
        parts_sum = {"loss": 0.0, "moe_aux_loss": 0.0, "gate_balance_loss": 0.0,
                     "gate_entropy_loss": 0.0}  # fmt: skip
        finite = True
        for _ in range(config.grad_accum_steps):
            inputs, targets = (t.to(self.device) for t in self.batches.next_batch())
            with _autocast(self.device, self.dtype):
                parts = compute_loss(self.model, inputs, targets)
            # Dividing each micro-batch's mean by their number makes the summed gradient the
            # gradient of the mean over the whole step's tokens — the same as one big batch.
            loss = parts.total / config.grad_accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            finite &= bool(torch.isfinite(parts.total))
            for key, value in zip(parts_sum, (parts.lm, parts.moe_aux, parts.gate_balance,
                                              parts.gate_entropy)):  # fmt: skip
                parts_sum[key] += float(value.detach()) / config.grad_accum_steps
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and report the true gradient
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # fp16's scaled gradients overflow now and then by design: the scaler skips that step
        # and lowers the scale. Only a non-finite *loss* counts towards divergence then.
        loss_finite = finite
        finite &= math.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        statistics = model_statistics(self.model)  # before the MoE load counters are reset
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself if a gradient is inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self.bad_steps_in_row = 0
        else:
            self.skipped_steps += 1
            if self.scaler is None or not loss_finite:  # not a mere fp16 gradient overflow
                self.bad_steps_in_row += 1
        self._update_moe_balance(apply_bias=finite)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # after only skipped steps torch warns about the order
            warnings.filterwarnings("ignore", "Detected call of")
            self.scheduler.step()
        self.step += 1
        self.tokens_seen += config.tokens_per_step
        if self.bad_steps_in_row >= config.max_bad_steps:
            raise TrainingDivergedError(
                f"{self.bad_steps_in_row} steps in a row had a non-finite loss or gradient (last "
                f"at step {self.step}, lr {lr:.3g}). The run has diverged: lower train.lr or "
                "raise train.warmup_steps, keep train.grad_clip on, or use train.precision=fp32; "
                + self._restart_advice()
            )
        numbers = {**parts_sum, "grad_norm": grad_norm, "lr": lr, "skipped": not finite,
                   "statistics": statistics}  # fmt: skip
        if self.scaler is not None:
            numbers["loss_scale"] = float(self.scaler.get_scale())
        return numbers

    def _restart_advice(self) -> str:
        checkpoint = latest_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return "no checkpoint was saved yet, so start over (--fresh)."
        return f"then resume from the last good checkpoint, {checkpoint}."

    def _update_moe_balance(self, *, apply_bias: bool) -> None:
        """Aux-loss-free balancing: nudge each router's expert bias after a real step.

        Either way the per-step load counters start from zero again, so the logged load is
        the last step's.
        """
        for module in self.model.modules():
            if isinstance(module, MoE):
                if apply_bias and module.router.use_bias:
                    module.update_expert_bias()
                else:
                    module.load_since_update.zero_()

    # ---------------------------------------------------------------- measuring
    def evaluate(self, max_blocks: int | None = -1) -> EvalResult:
        """Validation loss and bpc (``-1``: the periodic subset; ``None``: every block)."""
        blocks = (
            self.config.eval_batches * self.config.batch_size if max_blocks == -1 else max_blocks
        )
        return evaluate(
            self.model,
            self.validation,
            batch_size=self.config.batch_size,
            max_blocks=blocks,
            device=self.device,
            dtype=self.dtype,
        )

    def sample(self) -> str:
        return generate_sample(
            self.model,
            self.tokenizer,
            self.config.sample_prompt,
            max_new_tokens=self.config.sample_tokens,
            temperature=self.config.sample_temperature,
            seed=self.config.seed + self.step,
            device=self.device,
        )

    def _evaluate_and_report(
        self, last_train: dict[str, Any], writer, *, final: bool
    ) -> EvalResult:
        with self.gate_monitor.evaluating(self.step):
            result = self.evaluate(None if final else -1)
        text = self.sample()
        record = {
            "kind": "eval",
            "step": self.step,
            "loss": last_train.get("loss"),
            "lr": last_train.get("lr"),
            "tokens": self.tokens_seen,
            "val_loss": result.loss,
            "val_bpc": result.bpc,
            "val_tokens": result.tokens,
            "final": final,
        }
        if self.gate_monitor.evaluations:
            gates = self.gate_monitor.evaluations[-1]
            for layer, mean, std in zip(gates.layers, gates.mean.tolist(), gates.std.tolist()):
                record[f"val_gate/layer{layer}/mean"] = mean
                record[f"val_gate/layer{layer}/std"] = std
        self.last_sample = text
        if not self.is_main:
            return result
        self.metrics.append(record)
        with open(self.out_dir / "samples.txt", "a", encoding="utf-8") as handle:
            handle.write(f"--- step {self.step}, val_loss {result.loss:.4f}\n{text}\n\n")
        if writer is not None:
            writer.add_scalar("val/loss", result.loss, self.step)
            writer.add_scalar("val/bpc", result.bpc, self.step)
            writer.add_text("sample", text, self.step)
            writer.flush()
        plot_loss_curve(self.metrics.read(), self.out_dir / "loss_curve.png")
        plot_gate_heatmaps(self.gate_monitor, self.out_dir / "gate_heatmaps.png")
        if self.verbose:
            tqdm.write(
                f"step {self.step:>5} | train loss {record['loss']:.3f} | val loss "
                f"{result.loss:.3f} | val bpc {result.bpc:.3f}" + (" (all blocks)" if final else "")
            )
        return result

    def _tensorboard(self):
        if not self.config.tensorboard or not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    # ---------------------------------------------------------------- the loop
    def fit(
        self,
        *,
        stop_at: int | None = None,
        export: bool = True,
        on_step: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Train until ``config.max_steps`` (or ``stop_at``, a pause: save and return).

        At the end (``max_steps``): a final evaluation on the whole validation file, a sample, a
        checkpoint and, with ``export``, the Hugging Face folder ``out_dir/model``. On SIGTERM or
        SIGINT: the current step finishes, a checkpoint is saved, and ``fit`` returns with
        ``stopped_by`` set to the signal's name.
        """
        config = self.config
        target = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        writer = self._tensorboard()
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)  # fmt: skip
        stopped_by = "max_steps" if target == config.max_steps else "stop_at"
        last: dict[str, Any] = {}
        final_eval = None
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with StopRequest().installed() as stop:
                while self.step < target:
                    step_start, tokens_before = time.perf_counter(), self.tokens_seen
                    numbers = self.train_step()
                    self.gate_monitor.end_step(self.step)
                    self.train_seconds += time.perf_counter() - step_start
                    window_tokens += self.tokens_seen - tokens_before  # all ranks together
                    last = {"loss": numbers["loss"], "lr": numbers["lr"]}
                    bar.update(1)
                    if self.step % config.log_every == 0 or self.step == target:
                        elapsed = time.perf_counter() - window_start
                        record = self._train_record(numbers, window_tokens / max(elapsed, 1e-9))
                        if self.is_main:
                            self.metrics.append(record)
                        if writer is not None:
                            for key, value in record.items():
                                if key not in ("kind", "step"):
                                    writer.add_scalar(f"train/{key}", value, self.step)
                        bar.set_postfix(loss=f"{numbers['loss']:.3f}",
                                        tok_s=f"{record['tokens_per_s']:.0f}",
                                        lr=f"{numbers['lr']:.2e}")  # fmt: skip
                        window_tokens, window_start = 0, time.perf_counter()
                    if on_step is not None:
                        on_step(self, numbers)
                    finishing = self.step == config.max_steps
                    signal_name = self._stop_requested(stop)
                    if finishing or (self.step % config.eval_every == 0 and not signal_name):
                        final_eval = self._evaluate_and_report(last, writer, final=finishing)
                    if signal_name:
                        stopped_by = signal_name
                        break
                    if self.step % config.save_every == 0 and not finishing:
                        self.save()
                checkpoint = self.save() if self.step > 0 else None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        exported = None
        if export and stopped_by == "max_steps":
            exported = self.export(self.out_dir / "model", final_eval)
        return TrainResult(
            step=self.step,
            tokens=self.tokens_seen,
            stopped_by=stopped_by,
            checkpoint=checkpoint,
            final_eval=final_eval if stopped_by == "max_steps" else None,
            export=exported,
            seconds=self.train_seconds,
            skipped_steps=self.skipped_steps,
            records=self.metrics.read(),
        )

    def _stop_requested(self, stop: StopRequest) -> str | None:
        """The signal that asks this run to stop, if any (distributed runs agree across ranks)."""
        return stop.signal_name

    def export(self, directory: str | Path, final_eval: EvalResult | None = None) -> Path:
        """Write the model as a Hugging Face folder (safetensors, its code, a model card with
        this run's settings and ``final_eval``) into ``directory``."""
        return export_pretrained(
            self.model, self.tokenizer, directory, training=self.card_facts(final_eval)
        ).path

    def card_facts(self, final_eval: EvalResult | None = None) -> dict[str, str]:
        """What the model card says about this run (``hub.write_model_card``)."""
        config = self.config
        facts = {
            "steps": f"{self.step:,}",
            "tokens seen": f"{self.tokens_seen:,}",
            "sequence length": str(config.block_size),
            "sequences per step": f"{config.batch_size} × {config.grad_accum_steps} accumulation",
            "optimizer": f"AdamW, peak lr {config.lr:g}, {config.warmup_steps} warm-up steps, "
            f"weight decay {config.weight_decay:g}",
            "precision": str(self.compute_dtype).removeprefix("torch."),
        }
        if final_eval is not None:
            facts["validation loss"] = f"{final_eval.loss:.4f} nats per token"
            facts["validation bits per character"] = f"{final_eval.bpc:.4f}"
        return facts

    def _train_record(self, numbers: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
        record = {
            "kind": "train",
            "step": self.step,
            "loss": numbers["loss"],
            "lr": numbers["lr"],
            "tokens": self.tokens_seen,
            "grad_norm": numbers["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "epoch": self.batches.epoch,
            "skipped_steps": self.skipped_steps,
        }
        if "loss_scale" in numbers:  # fp16: the scaler's current multiplier
            record["loss_scale"] = numbers["loss_scale"]
        for key in ("moe_aux_loss", "gate_balance_loss", "gate_entropy_loss"):
            if numbers[key]:
                record[key] = numbers[key]
        record.update(numbers["statistics"])
        monitor = self.gate_monitor
        if monitor.steps and monitor.steps[-1] == self.step:  # this step over all micro-batches
            for layer, mean, std in zip(
                monitor.layers, monitor.step_mean[-1], monitor.step_std[-1]
            ):
                record[f"gate/layer{layer}/mean"] = mean
                record[f"gate/layer{layer}/std"] = std
        return record


def _resolve_device(name: str) -> torch.device:
    from .utils import pick_device

    return pick_device(None if name == "auto" else name)
