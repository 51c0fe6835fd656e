"""Chapter 12 — number formats for training: autocast dtype, fp16 loss scaling, TF32.

``precision: auto`` is bf16 on CUDA GPUs that support it, fp16 with a loss scaler on older ones
and fp32 on CPUs, where autocast only adds conversions (chapter 12 measures it).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


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
