"""Chapter 10 — SRTE: one time encoding shared by every layer's Mamba branch.

In a hybrid layer the two branches learn *where* a token sits in different ways: attention from
RoPE's rotations (relative offsets, chapter 05), Mamba from the order in which its recurrence
reads the tokens (it has no notion of an absolute position at all). FusionTree's SRTE — a
shared time encoding — gives both branches one common clock: a table of ``(position, H)``
vectors, computed once for the whole model (like the rotary table), added to the Mamba branch's
normalised input in every layer that has one, while attention keeps RoPE.

``config.srte``:

* ``"sinusoidal"`` — fixed, no parameters: channel pair ``i`` holds ``sin(p·ω_i), cos(p·ω_i)``
  with ``ω_i = 10000^(−2i/H)`` (the original Transformer's encoding, Vaswani et al., 2017).
  Defined for every position.
* ``"learned"`` — a trainable ``(max_position_embeddings, H)`` table started at the sinusoid;
  positions past the table are an error that names the fix.
"""

import torch
from torch import nn

from .config import MiniFusionConfig
from .utils import as_dtype

__all__ = ["SharedTimeEncoding", "sinusoidal_table"]


def sinusoidal_table(length: int, hidden_size: int, base: float = 10000.0) -> torch.Tensor:
    """``(length, hidden_size)`` fp32: columns ``2i, 2i+1`` = ``sin, cos`` of ``p · base^(−2i/H)``."""
    positions = torch.arange(length, dtype=torch.float32)[:, None]
    frequencies = base ** (-torch.arange(0, hidden_size, 2, dtype=torch.float32) / hidden_size)
    angles = positions * frequencies  # (L, ⌈H/2⌉)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)
    return table[:, :hidden_size]


class SharedTimeEncoding(nn.Module):
    """``srte(position_ids (B, T))`` → ``(B, T, H)`` in ``dtype``: the model's one time table."""

    def __init__(self, config: MiniFusionConfig):
        super().__init__()
        if config.srte not in ("sinusoidal", "learned"):
            raise ValueError(f"srte={config.srte!r}: expected 'sinusoidal' or 'learned'.")
        self.kind = config.srte
        self.hidden_size = config.hidden_size
        self.max_positions = config.max_position_embeddings
        initial = sinusoidal_table(self.max_positions, self.hidden_size)
        if self.kind == "learned":
            self.table = nn.Parameter(initial)
        else:  # recomputed on load, grown on demand: never saved
            self.register_buffer("table", initial, persistent=False)

    def reset(self) -> None:
        """The sinusoid again (the model's init calls this; ``from_pretrained`` then loads a
        learned table over it)."""
        initial = sinusoidal_table(self.max_positions, self.hidden_size)
        if self.kind == "sinusoidal":
            self.table = initial.to(None if self.table.is_meta else self.table.device)
        elif not self.table.is_meta:
            with torch.no_grad():
                self.table.copy_(initial)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        needed = int(position_ids.max()) + 1
        if needed > self.table.shape[0]:
            if self.kind == "learned":
                raise ValueError(
                    f"Position {needed - 1} is past the learned SRTE table "
                    f"(max_position_embeddings={self.max_positions}). Use shorter inputs, or "
                    "srte='sinusoidal', which is defined for every position."
                )
            length = max(needed, 2 * self.table.shape[0])
            self.table = sinusoidal_table(length, self.hidden_size).to(self.table.device)
        return as_dtype(self.table[position_ids], dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden_size={self.hidden_size}"
