"""Chapter 12 — every training setting in one dataclass, :class:`TrainConfig`.

A preset's ``train:`` section and ``--set train.<name>=<value>`` fill it; YAML strings such as
``3e-3`` are converted and unknown names refused with the list of valid ones. The trainer
(:mod:`minifusion.training`) and DeepSpeed's configuration (:mod:`minifusion.distributed`) read
it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

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
    # 0: the loss from the full (tokens, vocab) logits; N: next-token cross-entropy N positions
    # at a time from the last hidden states (minifusion.chunked_loss): the same loss and
    # gradients without holding the logits — less memory, and faster on CPU (chapter 12).
    # Single-process training only (not under DeepSpeed).
    loss_chunk_rows: int = 0
    seed: int = 0
    # Measuring
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 50  # steps between evaluations (and the last step always)
    eval_batches: int = 8  # validation batches per periodic evaluation (the final one uses all)
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 60  # generated after each evaluation, into samples.txt (0: none)
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
            (
                0 <= self.warmup_steps <= self.max_steps,
                f"warmup_steps must be in [0, max_steps]; it is {self.warmup_steps} with "
                f"max_steps={self.max_steps} (for a short run, lower it too: --set "
                f"train.warmup_steps={max(self.max_steps // 10, 0)})",
            ),
            (self.grad_clip >= 0, "grad_clip must be ≥ 0 (0 switches clipping off)"),
            (0 <= self.weight_decay < math.inf, "weight_decay must be ≥ 0 (e.g. 0.1; 0: none)"),
            (
                0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
                f"beta1 and beta2 must be in [0, 1); they are {self.beta1} and {self.beta2} "
                "(AdamW's usual: 0.9 and 0.95)",
            ),
            (0 < self.eps < math.inf, "eps must be > 0 (AdamW's usual: 1e-8)"),
            (
                0 < self.sample_temperature < math.inf,
                "sample_temperature must be > 0 (sampling divides the logits by it; lower it, "
                "e.g. 0.2, for more predictable samples, or set sample_tokens=0 for none)",
            ),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (
                min(self.log_every, self.eval_every, self.save_every) >= 1,
                "log_every, eval_every and save_every must be ≥ 1",
            ),  # fmt: skip
            (self.eval_batches >= 1, "eval_batches must be ≥ 1"),
            (self.sample_tokens >= 0, "sample_tokens must be ≥ 0 (0: no sample texts)"),
            (self.loss_chunk_rows >= 0, "loss_chunk_rows must be ≥ 0 (0: the full logits)"),
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
