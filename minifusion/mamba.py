"""Chapter 09 — Mamba: a selective state-space mixer with a scan, a causal conv and a recurrent step.

Attention keeps every past token and looks back at all of them. A state-space model instead
carries a fixed-size *state* forward, like a bucket that leaks: each step some of the old
water drains away (decay) and some new water pours in (input). For every channel ``d`` and
state slot ``n``::

    h_t[d, n] = exp(Δ_t[d] · A[d, n]) · h_{t−1}[d, n]  +  Δ_t[d] · B_t[n] · u_t[d]
    y_t[d]    = Σ_n C_t[n] · h_t[d, n]  +  D[d] · u_t[d]

``A < 0`` sets how fast each slot leaks; ``exp(Δ·A)`` is the zero-order-hold discretisation of
the continuous system ``h' = A h + B u`` over a step of length ``Δ`` (the ``B`` term uses the
simplified ``Δ·B`` of the Mamba paper). Mamba (Gu & Dao, 2023) makes ``Δ``, ``B`` and ``C``
functions of the input — *selectivity* — so the model decides per token how much to remember
(large ``Δ``: reset and take the new input; small ``Δ``: keep the state, ignore the token).

Three scans compute the same recurrence, all with the interface of mamba-ssm's
``selective_scan_fn``:

The two plain-PyTorch scans live in :mod:`minifusion.selective_scan` (importable from here too):

* :func:`selective_scan_sequential` — the loop above, one position at a time, in fp32.
* :func:`selective_scan_chunked` — the sequence is cut into chunks of ``chunk_size``. Every chunk
  is scanned from a zero state *at the same time* (a loop of ``chunk_size`` steps whose tensors
  hold all chunks); a short recurrence across chunks (``L / chunk_size`` steps) then carries the
  true state into each chunk, using the chunk's total decay ``exp(A · ΣΔ)`` — a cumulative
  log-decay, so only factors ≤ 1 are ever multiplied and nothing is divided. A final pass per
  chunk, started from its true state, produces the outputs. ``chunk_size + L / chunk_size``
  sequential steps instead of ``L``. Its backward pass is written by hand: it recomputes the
  states chunk by chunk and runs the same chunked recurrence backwards in time for the
  gradients, so the forward pass stores no per-position states (like mamba-ssm's kernel).
* :func:`~minifusion.fused_scan.selective_scan_fused` — our compiled C++/OpenMP kernel for CPUs
  (``minifusion/csrc/selective_scan.cpp``): the sequential loop, with each block of channels'
  state kept in registers and cache instead of passing through memory at every step.
* :func:`selective_scan_cuda` — mamba-ssm's fused CUDA kernel, when installed.

``scan_impl="auto"`` takes mamba-ssm's kernel on CUDA and ours on CPU (the chunked scan where
neither can run).

:class:`MambaMixer` wraps a scan in mamba-ssm's block: ``in_proj`` → causal depthwise ``conv1d``
→ SiLU → ``x_proj`` (Δ, B, C) → ``dt_proj`` → softplus → scan with the ``D`` skip → gate
``· SiLU(z)`` → ``out_proj``. Generation uses :meth:`MambaMixer.step` with a constant-size
:class:`MambaState`.
"""

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .config import MiniFusionConfig
from .fused_scan import (
    fused_conv_step,
    fused_scan_available,
    fused_state_step,
    selective_scan_fused,
)
from .selective_scan import (
    ScanResult,
    _check_scan_inputs,
    _decay,
    _outer,
    _skip_and_gate,
    _step_sizes,
    selective_scan_chunked,
    selective_scan_sequential,
)
from .utils import as_dtype

__all__ = [
    "MambaMixer",
    "MambaState",
    "causal_conv1d",
    "resolve_scan_impl",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_cuda",
    "selective_scan_fused",
    "selective_scan_sequential",
    "selective_state_update",
]

# --------------------------------------------------------------------------------------------
# 3. mamba-ssm's CUDA kernel, and picking a scan.
# --------------------------------------------------------------------------------------------


def mamba_ssm_available() -> bool:
    """True when mamba-ssm (the optional ``gpu`` extra) is installed."""
    return importlib.util.find_spec("mamba_ssm") is not None


def selective_scan_cuda(
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
) -> ScanResult:
    """mamba-ssm's fused ``selective_scan_fn`` (CUDA tensors, ``pip install '.[gpu]'``)."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if not mamba_ssm_available():
        raise RuntimeError(
            "scan_impl='cuda' needs mamba-ssm, which is not installed. Install the GPU extra "
            "(`pip install -e '.[gpu]'` on a machine with CUDA) or use scan_impl='chunked'."
        )
    if u.device.type != "cuda":
        raise RuntimeError(
            f"scan_impl='cuda' needs CUDA tensors; these are on {u.device}. "
            "Use scan_impl='auto' or 'chunked' on this device."
        )
    # In a try: a saved model's copy of this file must load where the optional extra is absent
    # (transformers refuses remote code whose plain imports are not installed).
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:  # installed but broken (a CUDA/torch mismatch, say)
        raise RuntimeError(f"mamba-ssm is installed but does not import: {error}") from error

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def resolve_scan_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` → ``"cuda"`` on CUDA tensors with mamba-ssm installed, ``"fused"`` on CPU
    tensors where our kernel builds, else ``"chunked"``."""
    if impl == "auto":
        if device.type == "cuda" and mamba_ssm_available():
            return "cuda"
        if device.type == "cpu" and fused_scan_available():
            return "fused"
        return "chunked"
    if impl not in _SCANS:
        raise ValueError(f"Unknown scan_impl={impl!r}; choose one of {('auto', *_SCANS)}.")
    return impl


_SCANS = {
    "sequential": selective_scan_sequential,
    "chunked": selective_scan_chunked,
    "fused": selective_scan_fused,
    "cuda": selective_scan_cuda,
}


def selective_scan(
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
    *,
    impl: str = "auto",
    chunk_size: int = 64,
) -> ScanResult:
    """Run the scan named by ``impl`` (``auto``, ``sequential``, ``chunked``, ``fused`` or
    ``cuda``)."""
    impl = resolve_scan_impl(impl, u.device)
    extra = {"chunk_size": chunk_size} if impl == "chunked" else {}
    return _SCANS[impl](
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **extra
    )


# --------------------------------------------------------------------------------------------
# Recurrent inference: one token at a time with a constant-size state.
# --------------------------------------------------------------------------------------------


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution: ``x (batch, d_inner, L)``, ``weight (d_inner, 1, K)``.

    Output ``t`` mixes inputs ``t−K+1 … t`` of its own channel (zeros before the start).
    """
    kernel = weight.shape[-1]
    return F.conv1d(F.pad(x, (kernel - 1, 0)), weight, bias, groups=x.shape[1])


def selective_state_update(
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
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """One step of the scan; updates ``state (batch, d_inner, N)`` (fp32) in place.

    ``x, delta, z: (batch, d_inner)``; ``B, C: (batch, N)``. Returns ``y (batch, d_inner)`` in
    ``x``'s dtype. Where ``impl`` resolves to ``"fused"`` (CPU, compiled kernel) the whole step
    is one call (:func:`~minifusion.fused_scan.fused_state_step`); otherwise the PyTorch
    operations below run it.
    """
    fused = resolve_scan_impl(impl, state.device) == "fused"
    if fused and state.is_contiguous() and state.dtype == torch.float32:
        return fused_state_step(state, x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    step = _step_sizes(delta[..., None], delta_bias, delta_softplus)[..., 0]
    new_state = _decay(step, A.float()) * state + _outer(step * x.float(), B.float())
    state.copy_(new_state)
    y = torch.bmm(new_state, C.float()[:, :, None]).squeeze(-1)
    y = _skip_and_gate(y[..., None], x[..., None], D, None if z is None else z[..., None])
    return y[..., 0].to(x.dtype)


_KERNEL_DTYPES = (torch.float32, torch.float64)  # what the compiled kernel computes in


@dataclass
class MambaState:
    """What one Mamba layer remembers during generation — its size never grows.

    ``conv``: the last ``d_conv`` inputs of the causal conv, ``(batch, d_inner, d_conv)``.
    ``ssm``: the scan's state, ``(batch, d_inner, d_state)``, fp32.
    ``seen``: how many tokens have been absorbed (0 = empty).
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    seen: int = 0

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows of ``beam_idx`` (beam search)."""
        self.conv = self.conv.index_select(0, beam_idx.to(self.conv.device))
        self.ssm = self.ssm.index_select(0, beam_idx.to(self.ssm.device))


# --------------------------------------------------------------------------------------------
# The mixer.
# --------------------------------------------------------------------------------------------


class MambaMixer(nn.Module):
    """mamba-ssm's Mamba block (Gu & Dao, 2023) with Hugging Face parameter names.

    ``forward(hidden_states (B, T, H), state=None, attention_mask=None) → (B, T, H)``. With a
    :class:`MambaState`, an empty state is filled from the prompt (prefill); later calls continue
    one token at a time (:meth:`step`). ``attention_mask (B, T)`` zeroes padded positions, so a
    left-padded row gives the same outputs as the unpadded one.

    ``A_log``, ``D`` and ``dt_proj.bias`` stay fp32 (even after ``.to(torch.bfloat16)``) and are
    flagged ``_no_weight_decay``; the scan always runs in fp32.
    """

    FP32_PARAMETERS = ("A_log", "D", "dt_proj.bias")

    def __init__(self, config: MiniFusionConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner = config.mamba_d_inner
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.dt_rank = config.resolved_dt_rank
        self.scan_impl = config.mamba_scan_impl
        self.chunk_size = config.mamba_chunk_size

        self.in_proj = nn.Linear(self.hidden_size, 2 * self.d_inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        self.reset_ssm_parameters(config)
        for name in self.FP32_PARAMETERS:
            self.get_parameter(name)._no_weight_decay = True

    @torch.no_grad()
    def reset_ssm_parameters(self, config: MiniFusionConfig) -> None:
        """mamba-ssm's initialisation of the state-space parameters.

        * ``A_log[d, n] = log(n + 1)``, so ``A = −(1, 2, …, N)`` (S4D-real): slots leak at
          different speeds, from slow memory to fast.
        * ``D = 1``: the skip passes the input through.
        * ``dt_proj.weight`` uniform in ``±dt_rank^−½``; ``dt_proj.bias = softplus⁻¹(Δ₀)`` with
          ``Δ₀`` log-uniform in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``), so at the
          start ``softplus(bias) = Δ₀``.
        """
        # transformers' init functions: plain torch.nn.init, except that they leave parameters
        # alone that from_pretrained has already loaded.
        device = self.A_log.device
        slots = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        init.copy_(self.A_log, torch.log(slots).expand(self.d_inner, -1))
        init.ones_(self.D)
        bound = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -bound, bound)
        low, high = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (high - low) + low)
        dt = dt.clamp(min=config.mamba_dt_init_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    def _apply(self, fn, recurse=True):
        # keep the state-space parameters in fp32 when the module is cast to another dtype
        super()._apply(fn, recurse)
        for name in self.FP32_PARAMETERS:
            parameter = self.get_parameter(name)
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
        return self

    def new_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """An empty generation state (zeros) for ``batch_size`` rows."""
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device)
        return MambaState(conv, ssm)

    def _ssm_inputs(self, x: torch.Tensor):
        """``x (..., d_inner)`` → Δ before softplus ``(..., d_inner)``, ``B`` and ``C (..., N)``."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj.bias goes into the scan as delta_bias; the weight may be kept fp32 (loading
        # with dtype=bf16 keeps the whole dt_proj in fp32), the matmul runs in the input dtype
        return F.linear(dt, as_dtype(self.dt_proj.weight, dt.dtype)), B, C

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: MambaState | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if state is not None and state.seen > 0:
            return torch.stack(
                [self.step(token, state) for token in hidden_states.unbind(1)], dim=1
            )
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, T, d_inner) each
        # Padding is zeroed at the conv's input, after in_proj: zeroing the hidden states before
        # it would still let in_proj's bias (mamba_proj_bias) through into the conv and its state.
        x = _zero_padding(x, attention_mask).transpose(1, 2)  # (B, d_inner, T)
        z = z.transpose(1, 2)
        if state is not None:  # prefill: remember the last d_conv conv inputs
            state.conv.copy_(F.pad(x, (max(self.d_conv - length, 0), 0))[..., -self.d_conv :])
        x = F.silu(self.conv1d(x)[..., :length])
        x = _zero_padding(x.transpose(1, 2), attention_mask)  # (B, T, d_inner)
        dt, B, C = self._ssm_inputs(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, last = selective_scan(
                x.transpose(1, 2).float(),
                dt.transpose(1, 2).float(),
                -torch.exp(self.A_log.float()),
                B.transpose(1, 2).float(),
                C.transpose(1, 2).float(),
                D=self.D.float(),
                z=z.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
                return_last_state=True,
                impl=self.scan_impl,
                chunk_size=self.chunk_size,
            )
        if state is not None:
            state.ssm.copy_(last)
            state.seen += length
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    def step(self, hidden_states: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: ``(B, H)`` → ``(B, H)``, updating ``state`` in place (constant memory).

        A decode step of a small model is dominated by the number of operations, not their
        size, so this path avoids the no-op casts and, with the compiled kernel, runs the conv
        window and the scan step as one call each.
        """
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, d_inner) each
        x = self._conv_step(x, state.conv)
        dt, B, C = self._ssm_inputs(x)
        f32 = torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = selective_state_update(
                state.ssm,
                as_dtype(x, f32),
                as_dtype(dt, f32),
                self._A(),
                as_dtype(B, f32),
                as_dtype(C, f32),
                D=self.D,  # D, A_log and dt_proj.bias are always fp32
                z=as_dtype(z, f32),
                delta_bias=self.dt_proj.bias,
                delta_softplus=True,
                impl=self.scan_impl,
            )
        state.seen += 1
        return self.out_proj(as_dtype(y, hidden_states.dtype))

    def _conv_step(self, x: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
        """Append ``x (B, d_inner)`` to the conv window ``conv (B, d_inner, d_conv)`` in place
        and return SiLU of the causal conv at the new position."""
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias  # (d_inner, d_conv)
        fused = resolve_scan_impl(self.scan_impl, conv.device) == "fused"
        same_dtype = x.dtype == conv.dtype == weight.dtype
        if fused and conv.is_contiguous() and same_dtype and conv.dtype in _KERNEL_DTYPES:
            return fused_conv_step(conv, x, weight, bias)
        conv.copy_(torch.cat([conv[..., 1:], x[..., None].to(conv.dtype)], -1))
        x = (conv * weight).sum(-1)
        if bias is not None:
            x = x + bias
        return F.silu(x)

    def _A(self) -> torch.Tensor:
        """``A = −exp(A_log)`` ``(d_inner, N)``, fp32. Without gradients (decoding) it is kept
        until ``A_log`` changes (an optimizer step or a load bumps its version)."""
        if torch.is_grad_enabled() and self.A_log.requires_grad:
            return -torch.exp(self.A_log.float())
        key = (self.A_log._version, self.A_log.data_ptr())
        if getattr(self, "_A_kept", (None,))[0] != key:
            self._A_kept = (key, -torch.exp(self.A_log.float()))
        return self._A_kept[1]


def _zero_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
    """Zero the positions where ``attention_mask (B, T)`` is 0 (``hidden_states (B, T, ·)``)."""
    if attention_mask is None:
        return hidden_states
    return hidden_states * attention_mask[:, -hidden_states.shape[1] :, None].to(
        hidden_states.dtype
    )
