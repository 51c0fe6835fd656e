"""Chapter 07 — SwiGLU: the feed-forward network with a gate.

A plain transformer MLP widens each token's vector, applies a non-linearity and narrows it back:
``down(act(up(x)))``. SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer") adds a second
widening, the *gate*, and multiplies the two element-wise::

    SwiGLU(x) = down_proj( SiLU(gate_proj(x)) ⊙ up_proj(x) )

``up_proj`` proposes content, ``SiLU(gate_proj(x))`` decides per channel how much of it passes
(a smooth valve between 0 and "fully open"). Three matrices instead of two, so the hidden width
shrinks from 4H to about 8H/3 to keep the parameter count — see
:func:`minifusion.config.swiglu_intermediate_size`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniFusionConfig

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """``(B, T, H)`` → ``(B, T, H)`` through an ``intermediate_size``-wide gated hidden layer.

    ``intermediate_size`` defaults to the config's (the 8/3 rule); Mixture-of-Experts experts
    (chapter 08) pass their own, smaller width.
    """

    def __init__(self, config: MiniFusionConfig, intermediate_size: int | None = None):
        super().__init__()
        self.hidden_size = config.hidden_size
        if intermediate_size is None:
            intermediate_size = config.intermediate_size
        if intermediate_size < 1:
            raise ValueError(
                f"intermediate_size={intermediate_size} must be a positive integer (the width of "
                "the gated hidden layer); leave it as None to use config.intermediate_size."
            )
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
