"""Chapter 03 — token embeddings and the (optionally tied) language-model head.

An embedding is a lookup table: row ``i`` of a ``(vocab_size, hidden_size)`` matrix is the
vector for token ``i``. Looking a row up is the same as multiplying a one-hot vector by the
matrix, only without the wasted multiplications by zero.

The LM head does the opposite trip: it scores every vocabulary entry against the final hidden
state, ``logits = h · Wᵀ``. *Tying* uses the same matrix ``W`` for both (Press & Wolf, 2017,
"Using the Output Embedding to Improve Language Models"): a token is predicted when the hidden
state points the way that token's embedding points, and the vocabulary costs parameters once.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MiniFusionConfig

__all__ = ["TokenEmbedding", "build_lm_head"]


class TokenEmbedding(nn.Module):
    """``embed_tokens``: token ids ``(B, T)`` → vectors ``(B, T, C)``.

    Initialised from ``N(0, initializer_range²)``. With the default 0.02 and a tied head, the
    first logits are tiny, every token gets probability ≈ 1/V, and the initial loss is ≈ ln V —
    the loss of a uniform guess, which chapter 03 checks.
    """

    def __init__(self, config: MiniFusionConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=config.initializer_range)

    @property
    def weight(self) -> nn.Parameter:
        return self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` ``(B, T)`` integer → ``(B, T, C)``."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
        # Checked on CPU only: on a GPU, reading min/max back would stall every forward pass
        # (there an out-of-range id trips CUDA's own device-side assert instead).
        if input_ids.numel() and input_ids.device.type == "cpu":
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.vocab_size:
                raise IndexError(
                    f"token id {high if high >= self.vocab_size else low} is outside the vocabulary "
                    f"[0, {self.vocab_size}). The tokenizer and config.vocab_size disagree: set "
                    "vocab_size to at least len(tokenizer)."
                )
        return self.embed_tokens(input_ids)


def build_lm_head(config: MiniFusionConfig, embedding: TokenEmbedding) -> nn.Linear:
    """``lm_head``: ``(B, T, C)`` → logits ``(B, T, V)``, sharing the embedding matrix if tied."""
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if config.tie_word_embeddings:
        head.weight = embedding.weight  # the very same Parameter: one tensor, two roles
    else:
        nn.init.normal_(head.weight, mean=0.0, std=config.initializer_range)
    return head
