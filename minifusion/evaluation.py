"""Chapter 12 — the training loss, validation loss and bits per character, and a text sample.

:func:`compute_loss` is next-token cross-entropy plus the model's auxiliary losses (MoE balance,
fusion-gate entropy); :func:`evaluate` scores a fixed :class:`ValidationSet` in bits per
character, so models with different tokenizers compare on the same text.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .chunked_loss import chunked_cross_entropy
from .data import TokenBlocks, TokenFile
from .precision import _autocast
from .recording import not_recorded


@dataclass
class LossParts:
    """The training objective and its parts (scalar tensors)."""

    total: torch.Tensor  # what backward() sees
    lm: torch.Tensor  # next-token cross-entropy in nats per token
    moe_aux: torch.Tensor
    gate_balance: torch.Tensor
    gate_entropy: torch.Tensor


def compute_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 0
) -> LossParts:
    """Cross-entropy of ``model(inputs)`` against ``targets`` plus the model's auxiliary losses.

    ``targets`` are the inputs shifted by one (``TokenBlocks`` gives both), so every one of the
    ``B·T`` positions is scored; passing ``labels=inputs`` to the model would score ``T−1``.
    ``chunk_rows > 0`` computes the cross-entropy that many positions at a time from the last
    hidden states (:mod:`minifusion.chunked_loss`): the same loss and gradients without ever
    holding the ``(B·T, V)`` logits — a :class:`~minifusion.model.MiniFusionForCausalLM` only.
    """
    if chunk_rows:
        out = _hidden_states_of(model, inputs)
        lm = chunked_cross_entropy(out.last_hidden_state.flatten(0, 1), model.lm_head.weight,
                                   targets.flatten(), chunk_rows)  # fmt: skip
    else:
        out = model(input_ids=inputs)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    total = lm + out.moe_aux_loss + out.gate_balance_loss + out.gate_entropy_loss
    return LossParts(total, lm, out.moe_aux_loss, out.gate_balance_loss, out.gate_entropy_loss)


def check_chunked_loss_model(model: nn.Module) -> None:
    """Raise unless ``model`` can take the chunked loss: a MiniFusion LM, whose head is one
    bias-free linear layer applied to its body's last hidden states."""
    from .model import MiniFusionForCausalLM  # imported here: the model module is the heavier one

    if not isinstance(model, MiniFusionForCausalLM):
        raise ValueError(
            f"The chunked loss (chunk_rows, train.loss_chunk_rows) needs a "
            f"MiniFusionForCausalLM, whose head is one bias-free linear layer; got "
            f"{type(model).__name__} (a wrapped or another model). Use 0: the loss from the "
            "full logits."
        )


def _hidden_states_of(model: nn.Module, inputs: torch.Tensor):
    """The body's output (last hidden states and auxiliary losses) of a MiniFusion LM."""
    check_chunked_loss_model(model)
    return model.model(input_ids=inputs)


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
