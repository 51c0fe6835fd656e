"""Chapter 09 — the fused CPU selective scan: one compiled loop instead of many tensor operations.

The sequential scan launches about ten PyTorch operations per position, and each reads and
writes the whole ``(batch, d_inner, N)`` state through memory: at ``d_inner = 512, N = 16`` that
is 64 KiB per sequence moved several times for 16 KiB of arithmetic. The chunked scan cuts the
number of steps, not the traffic. ``minifusion/csrc/selective_scan.cpp`` does what mamba-ssm's
CUDA kernel does on a GPU: one task per (sequence, block of 64 channels) walks the time loop
with its block's state in registers and L1 cache, reading only each position's inputs; tasks
run in parallel on PyTorch's threads. The backward pass recomputes states from entry states
the forward pass saved every 32 positions, so memory stays far below the chunked scan's.

:func:`selective_scan_fused` has the interface of the other scans (mamba-ssm's
``selective_scan_fn``); :func:`fused_state_step` is the one-token update used when decoding.
Both compute in fp32 (float64 for float64 inputs, so ``gradcheck`` can check the backward
pass), accept bf16/fp16 inputs, and return ``None``-free results in the input's dtype.
"""

from __future__ import annotations

import torch

from .extensions import scan_kernel
from .selective_scan import _check_scan_inputs  # the shape checks every scan shares
from .utils import as_dtype

__all__ = ["fused_conv_step", "fused_scan_available", "fused_state_step", "selective_scan_fused"]


def fused_scan_available() -> bool:
    """True when the compiled scan is (or can be) built on this machine."""
    return scan_kernel() is not None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else as_dtype(x, dtype)


class _FusedScan(torch.autograd.Function):
    """The kernel's forward and backward. Layouts are the kernel's: ``u, delta, z`` are
    ``(batch, L, d_inner)``, ``B, C`` ``(batch, L, N)``, ``A (d_inner, N)``; all one dtype.
    Returns ``out (batch, L, d_inner)`` and the last state ``(batch, N, d_inner)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool):
        out, last, saved = scan_kernel().forward(u, delta, A, B, C, D, z, delta_bias, softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved)
        ctx.softplus = softplus
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z, delta_bias, saved = ctx.saved_tensors
        if grad_out is None:  # only the last state was used
            grad_out = torch.zeros_like(u)
        grads = scan_kernel().backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, saved, grad_out, grad_last
        )
        return (*grads[:5], grads[5], grads[6], grads[7], None)


def selective_scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The compiled scan: same interface, shapes and results as the sequential scan.

    ``u, delta, z: (batch, d_inner, L)``; ``A: (d_inner, N)``; ``B, C: (batch, N, L)``;
    ``D, delta_bias: (d_inner,)``. Returns ``y`` in ``u``'s dtype and, with
    ``return_last_state``, the last state ``(batch, d_inner, N)`` in fp32 (fp64 for fp64 input).
    The kernel reads ``(batch, L, ·)`` layouts, which is how the Mamba mixer's tensors already
    sit in memory, so the transposes below copy nothing there.
    """

    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if scan_kernel() is None:
        raise RuntimeError(
            "scan_impl='fused' needs the compiled scan, which could not be built here (see the "
            "warning above). Use scan_impl='auto' or 'chunked'."
        )
    if u.device.type != "cpu":
        raise RuntimeError(
            f"scan_impl='fused' runs on CPU tensors; these are on {u.device}. Use "
            "scan_impl='auto' (mamba-ssm's kernel on CUDA) or 'chunked'."
        )
    dtype = _compute_dtype(u.dtype)
    out, last = _FusedScan.apply(
        u.transpose(1, 2).to(dtype),
        delta.transpose(1, 2).to(dtype),
        A.to(dtype),
        B.transpose(1, 2).to(dtype),
        C.transpose(1, 2).to(dtype),
        _cast(D, dtype),
        None if z is None else z.transpose(1, 2).to(dtype),
        _cast(delta_bias, dtype),
        delta_softplus,
    )
    y = out.transpose(1, 2).to(u.dtype)
    return (y, last.transpose(1, 2)) if return_last_state else y


def fused_state_step(
    state: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step in one call; updates ``state (batch, d_inner, N)`` in place.

    ``x, delta, z: (batch, d_inner)``; ``B, C: (batch, N)``. ``state`` must be contiguous and of
    the compute dtype (fp32, as :class:`~minifusion.mamba.MambaState` keeps it). Returns
    ``y (batch, d_inner)`` in ``x``'s dtype.
    """
    dtype = state.dtype
    y = scan_kernel().step(
        state, _cast(x, dtype), _cast(delta, dtype), _cast(A, dtype), _cast(B, dtype),
        _cast(C, dtype), _cast(D, dtype), _cast(z, dtype), _cast(delta_bias, dtype),
        delta_softplus,
    )  # fmt: skip
    return as_dtype(y, x.dtype)


def fused_conv_step(
    conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One decoding step of the causal depthwise conv and its SiLU, in one call.

    Shifts ``conv_state (batch, d_inner, d_conv)`` left by one in place, appends
    ``x (batch, d_inner)``, and returns ``SiLU(Σ_k conv_state[..., k] · weight[:, k] + bias)``,
    ``(batch, d_inner)``. ``weight (d_inner, d_conv)`` and ``bias`` must have the state's dtype
    (fp32 or fp64), ``conv_state`` must be contiguous.
    """
    return scan_kernel().conv_step(conv_state, x, weight, bias)
