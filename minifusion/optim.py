"""Chapter 12 — AdamW with two parameter groups, and the warm-up + cosine learning-rate schedule.

Weight decay goes to matrices only (not norms, biases, embeddings by choice, or Mamba's
``A_log``, ``D``, ``dt_proj.bias``); the learning rate rises linearly for ``warmup_steps``, then
follows a cosine down to ``min_lr_ratio · lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .train_config import TrainConfig


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
