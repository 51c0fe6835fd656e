"""Chapter 04 — RMSNorm: keep every token's vector at a steady size.

LayerNorm (Ba et al., 2016) re-centres a vector (subtracts its mean) and re-scales it (divides
by its standard deviation). RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer
Normalization") keeps only the re-scaling: it divides by the root mean square
``rms(x) = sqrt(mean(x²) + eps)`` and multiplies by a learnable per-channel ``weight``. No mean,
no bias — cheaper, and in practice just as good, which is why Llama, Mistral and Mamba use it.

Why fp32 inside: the mean of squares adds up ``C`` numbers. A running sum kept in bf16 (8 bits
of mantissa) stops growing once it is about 256 times larger than what is added to it, so the
statistic comes out far too small for wide layers; chapter 04 measures it. PyTorch's own bf16
reductions happen to accumulate in fp32 on CPU, but the squares, the division and other kernels
would still round to bf16 at every step. Upcasting the whole computation to fp32 makes the result
exact to fp32 rounding whatever kernel runs it; the output is cast back to the input dtype.
"""

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``y = weight · x / sqrt(mean(x²) + eps)`` over the last dimension.

    Input ``(..., C)`` of any float dtype → output of the same shape *and dtype*. The statistic
    is computed in fp32; the learnable ``weight`` (shape ``(C,)``, initialised to ones) is
    applied after casting back, matching transformers' ``LlamaRMSNorm`` operation for operation.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size} must be a positive integer.")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"RMSNorm expected a last dimension of {self.hidden_size}, got shape "
                f"{tuple(hidden_states.shape)}. Build it with hidden_size={hidden_states.shape[-1]} "
                "or pass tensors laid out as (..., hidden_size)."
            )
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean_square = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        # Cast back first, then scale: the same order as LlamaRMSNorm, so bf16 results agree
        # bit for bit. The final cast keeps the output in the input dtype even if the weight is
        # held in fp32 (mixed precision).
        return (self.weight * x.to(input_dtype)).to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
