"""Chapter 09 — the selective scan in plain PyTorch: the loop as written, and the chunked scan.

Both compute, for every channel ``d`` and state slot ``n``::

    h_t[d, n] = exp(Δ_t[d] · A[d, n]) · h_{t−1}[d, n]  +  Δ_t[d] · B_t[n] · u_t[d]
    y_t[d]    = Σ_n C_t[n] · h_t[d, n]  +  D[d] · u_t[d]

with the interface of mamba-ssm's ``selective_scan_fn``:

* :func:`selective_scan_sequential` — the recurrence one position at a time, in fp32: the
  reference every other scan is checked against.
* :func:`selective_scan_chunked` — chunks scanned side by side, then a short recurrence across
  chunks carries the true state into each (``chunk_size + L / chunk_size`` sequential steps
  instead of ``L``), with a hand-written backward pass that recomputes the states instead of
  storing them.

The shared input checks live here too, so the compiled kernel
(:mod:`minifusion.fused_scan`) uses them without importing the Mamba block;
:mod:`minifusion.mamba` picks a scan and wraps it in the block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ScanResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Shared pieces of every scan: input checks, the Δ preparation, the D skip and the z gate.
# --------------------------------------------------------------------------------------------


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Shapes of mamba-ssm's ``selective_scan_fn``; a wrong one is named with what was expected."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, length); got shape {tuple(u.shape)}.")
    batch, d_inner, length = u.shape
    n = A.shape[-1] if A.dim() == 2 else -1
    expected = {
        "delta": (delta, (batch, d_inner, length)),
        "A": (A, (d_inner, n)),
        "B": (B, (batch, n, length)),
        "C": (C, (batch, n, length)),
        "D": (D, (d_inner,)),
        "z": (z, (batch, d_inner, length)),
        "delta_bias": (delta_bias, (d_inner,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"selective scan: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"(u is (batch={batch}, d_inner={d_inner}, length={length}), "
                "A is (d_inner, d_state), B and C are (batch, d_state, length); "
                "time-invariant or grouped B/C are not supported)."
            )


def _step_sizes(delta, delta_bias, delta_softplus) -> torch.Tensor:
    """Δ in fp32: ``softplus(delta + delta_bias)`` (each part optional)."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z) -> torch.Tensor:
    """``(y + D·u) · SiLU(z)`` in fp32, each part optional; ``y`` is ``(batch, d_inner, L)``."""
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


# --------------------------------------------------------------------------------------------
# 1. The sequential scan: the recurrence exactly as written, one position at a time.
# --------------------------------------------------------------------------------------------


def selective_scan_sequential(
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
    """The didactic scan: a Python loop over positions, in fp32, differentiated by autograd.

    Shapes: ``u, delta, z: (batch, d_inner, L)``; ``A: (d_inner, N)``; ``B, C: (batch, N, L)``;
    ``D, delta_bias: (d_inner,)``. Returns ``y: (batch, d_inner, L)`` in ``u``'s dtype, and the
    last state ``(batch, d_inner, N)`` in fp32 when ``return_last_state``.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, d_inner, _ = u.shape
    step = _step_sizes(delta, delta_bias, delta_softplus)
    A, B, C, x = A.float(), B.float(), C.float(), u.float()
    state = x.new_zeros(batch, d_inner, A.shape[-1])
    outputs = []
    # unbind once: indexing [..., t] inside the loop would make autograd allocate a full-size
    # zero gradient for every position.
    for step_t, x_t, B_t, C_t in zip(step.unbind(-1), x.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(step_t[:, :, None] * A)  # (batch, d_inner, N)
        state = decay * state + (step_t * x_t)[:, :, None] * B_t[:, None, :]
        outputs.append(torch.bmm(state, C_t[:, :, None]).squeeze(-1))  # Σ_n C_t[n] h_t[:, n]
    y = torch.stack(outputs, dim=-1) if outputs else x.new_zeros(u.shape)
    y = _skip_and_gate(y, u, D, z).to(u.dtype)
    return (y, state) if return_last_state else y


# --------------------------------------------------------------------------------------------
# 2. The chunked scan.
# --------------------------------------------------------------------------------------------


def _to_chunk_steps(x: torch.Tensor, chunk: int, num_chunks: int) -> torch.Tensor:
    """``(batch, k, L)`` → ``(chunk, batch, num_chunks, k)``, zero-padded at the end.

    Index ``[t]`` is then the ``t``-th position of *every* chunk, contiguous in memory (the
    per-step operations run several times faster on contiguous operands). The copy goes through
    the ``(batch, L, k)`` layout: one plain transpose (free when ``x`` is a transposed view of
    it, as in the mixer), then whole rows of ``k`` values move at once — both much faster than
    one strided gather.
    """
    batch, k, length = x.shape
    rows = x.transpose(1, 2).contiguous()  # (batch, L, k)
    rows = F.pad(rows, (0, 0, 0, num_chunks * chunk - length))
    return rows.view(batch, num_chunks, chunk, k).permute(2, 0, 1, 3).contiguous()


def _from_chunk_steps(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunk_steps`: ``(chunk, batch, num_chunks, k)`` → ``(batch, k, L)``,
    contiguous (elementwise operations that mix memory layouts are slow)."""
    chunk, batch, num_chunks, k = x.shape
    rows = x.permute(1, 2, 0, 3).reshape(batch, num_chunks * chunk, k)
    return rows[:, :length].transpose(1, 2).contiguous()


def _decay(step_t: torch.Tensor, A: torch.Tensor, out: torch.Tensor | None = None):
    """``exp(Δ ⊗ A)``: ``(..., d_inner)`` and ``(d_inner, N)`` → ``(..., d_inner, N)``, all ≤ 1."""
    return torch.mul(step_t[..., None], A, out=out).exp_()


def _outer(column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``(..., d_inner)`` ⊗ ``(..., N)`` → ``(..., d_inner, N)``."""
    return column[..., :, None] * row[..., None, :]


# The chunked scan below runs every recurrence step in place on buffers allocated once: the
# per-step tensors hold all chunks (batch · num_chunks · d_inner · N floats), and allocating a
# fresh one per operation would cost more than the arithmetic.


def _chunk_entry_states(steps, inputs, Bs, A) -> tuple[torch.Tensor, torch.Tensor]:
    """The true state entering every chunk, ``(batch, num_chunks, d_inner, N)``, and the final one.

    First every chunk is scanned from zero (all chunks at once); then a recurrence over chunks
    carries the state across, decaying it by the chunk's total ``exp(A · ΣΔ)`` — a cumulative
    log-decay, never a quotient of small products.
    """
    local = steps.new_zeros(*steps.shape[1:], A.shape[-1])
    decay = torch.empty_like(local)
    for step_t, input_t, B_t in zip(steps, inputs, Bs):
        local.mul_(_decay(step_t, A, out=decay)).addcmul_(input_t[..., None], B_t[..., None, :])
    return _carry_across_chunks(local, steps, A, torch.zeros_like(local[:, 0]), reverse=False)


def _carry_across_chunks(local, steps, A, start, reverse: bool):
    """The short recurrence over chunks: ``carried = local[c] + exp(A · ΣΔ_c) · carried``.

    ``local`` ``(batch, num_chunks, d_inner, N)`` holds each chunk's contribution scanned from
    zero; ``start`` enters the first chunk (the last one when ``reverse``). Returns what enters
    every chunk, and what leaves the final one.
    """
    chunk_decay = _decay(steps.sum(0), A)  # cumulative log-decay of each whole chunk
    entry = torch.empty_like(local)
    carried = start
    order = reversed(range(local.shape[1])) if reverse else range(local.shape[1])
    for c in order:
        entry[:, c] = carried
        carried = torch.addcmul(local[:, c], chunk_decay[:, c], carried)
    return entry, carried


def _adjoint_entry_states(steps, grad_ys, Cs, A, grad_last) -> torch.Tensor:
    """The gradient w.r.t. the state flowing *backwards* into the end of every chunk.

    The backward pass of ``h_t = a_t h_{t−1} + x_t`` is the same kind of recurrence run in
    reverse: ``λ_t = C_t ⊗ gy_t + a_{t+1} λ_{t+1}``. Chunks are scanned from zero at their end,
    then a recurrence over chunks (from the last) carries the adjoint across.
    """
    local = grad_ys.new_zeros(*grad_ys.shape[1:], A.shape[-1])
    decay = torch.empty_like(local)
    for t in reversed(range(steps.shape[0])):  # local becomes a_t λ_t, handed to t − 1
        local.addcmul_(grad_ys[t][..., None], Cs[t][..., None, :]).mul_(
            _decay(steps[t], A, out=decay)
        )
    return _carry_across_chunks(local, steps, A, grad_last, reverse=True)[0]


class _ChunkedScan(torch.autograd.Function):
    """``y_t = Σ_n C_t h_t`` for ``h_t = exp(Δ_t A) h_{t−1} + Δ_t u_t B_t``, chunk-parallel.

    Inputs are fp32 and already prepared: ``steps`` (Δ) and ``inputs`` (Δ·u) are
    ``(batch, d_inner, L)``; ``A`` is ``(d_inner, N)``; ``B, C`` are ``(batch, N, L)``. Returns
    ``y (batch, d_inner, L)`` and the last state ``(batch, d_inner, N)``. Padding at the end uses
    Δ = 0 (decay 1, input 0), so it carries the last state through unchanged.

    Memory: the forward pass keeps only its inputs and the chunk entry states; the backward pass
    recomputes the states of every position (``batch · d_inner · N · L`` floats, the largest
    tensor either pass holds).
    """

    @staticmethod
    def forward(ctx, steps, inputs, A, B, C, chunk_size: int):
        length = steps.shape[-1]
        num_chunks = max(1, math.ceil(length / chunk_size))
        chunk = min(chunk_size, max(length, 1))
        steps_c, inputs_c, Bs, Cs = (
            _to_chunk_steps(x, chunk, num_chunks) for x in (steps, inputs, B, C)
        )
        entry, last = _chunk_entry_states(steps_c, inputs_c, Bs, A)
        state, decay = entry.clone(), torch.empty_like(entry)
        ys = steps_c.new_empty(steps_c.shape)
        for t in range(chunk):
            state.mul_(_decay(steps_c[t], A, out=decay))
            state.addcmul_(inputs_c[t][..., None], Bs[t][..., None, :])
            torch.matmul(state, Cs[t][..., None], out=ys[t][..., None])
        ctx.save_for_backward(steps, inputs, A, B, C, entry)
        ctx.chunk = chunk
        return _from_chunk_steps(ys, length), last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        steps, inputs, A, B, C, entry = ctx.saved_tensors
        length, chunk, num_chunks = steps.shape[-1], ctx.chunk, entry.shape[1]
        steps_c, inputs_c, Bs, Cs = (
            _to_chunk_steps(x, chunk, num_chunks) for x in (steps, inputs, B, C)
        )
        grad_ys = _to_chunk_steps(grad_y.float(), chunk, num_chunks)
        if grad_last is None:
            grad_last = torch.zeros_like(entry[:, 0])
        decay = torch.empty_like(entry)

        # Recompute the forward states: states[t] = h_{t−1} of position t (states[0] = entry).
        # dC_t = Σ_d gy_t[d] h_t[d, :] needs only the forward direction, so it is taken here.
        states = entry.new_empty(chunk + 1, *entry.shape)
        states[0] = entry
        grad_C = Bs.new_empty(Bs.shape)
        for t in range(chunk):
            torch.mul(states[t], _decay(steps_c[t], A, out=decay), out=states[t + 1])
            states[t + 1].addcmul_(inputs_c[t][..., None], Bs[t][..., None, :])
            torch.matmul(grad_ys[t][..., None, :], states[t + 1], out=grad_C[t][..., None, :])

        # Walk backwards in time with the true adjoint λ_t = ∂loss/∂h_t.
        adjoint = _adjoint_entry_states(steps_c, grad_ys, Cs, A, grad_last)
        grad_inputs, grad_steps = steps_c.new_empty(steps_c.shape), steps_c.new_empty(steps_c.shape)
        grad_B = Bs.new_empty(Bs.shape)
        grad_A = torch.zeros_like(entry)  # summed over batch and chunks at the end
        grad_log_decay, scaled = torch.empty_like(entry), torch.empty_like(entry)
        ones = A.new_ones(A.shape[-1], 1)
        for t in reversed(range(chunk)):
            adjoint.addcmul_(grad_ys[t][..., None], Cs[t][..., None, :])  # λ_t
            torch.matmul(adjoint, Bs[t][..., None], out=grad_inputs[t][..., None])
            torch.matmul(inputs_c[t][..., None, :], adjoint, out=grad_B[t][..., None, :])
            adjoint.mul_(_decay(steps_c[t], A, out=decay))  # a_t λ_t, handed back to t − 1
            # ∂loss/∂(Δ_t A) = λ_t a_t h_{t−1}; its sum over N against A is ∂loss/∂Δ_t
            torch.mul(adjoint, states[t], out=grad_log_decay)
            torch.mul(grad_log_decay, A, out=scaled)
            torch.matmul(scaled, ones, out=grad_steps[t][..., None])
            grad_A.addcmul_(grad_log_decay, steps_c[t][..., None])
        return (
            _from_chunk_steps(grad_steps, length),
            _from_chunk_steps(grad_inputs, length),
            grad_A.sum((0, 1)),
            _from_chunk_steps(grad_B, length),
            _from_chunk_steps(grad_C, length),
            None,
        )


def selective_scan_chunked(
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
    chunk_size: int = 64,
) -> ScanResult:
    """The chunk-parallel scan in pure PyTorch (fp32 inside), for any length.

    Same interface, shapes and results as :func:`selective_scan_sequential`; ``chunk_size`` sets
    how many positions each chunk holds (``chunk_size + L / chunk_size`` sequential steps).
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be ≥ 1 (try 64).")
    step = _step_sizes(delta, delta_bias, delta_softplus)
    y, last = _ChunkedScan.apply(
        step, step * u.float(), A.float(), B.float(), C.float(), chunk_size
    )
    y = _skip_and_gate(y, u, D, z).to(u.dtype)
    return (y, last) if return_last_state else y
