"""Chapter 06 — local (sliding-window) heads without a ``T × T`` score matrix.

:func:`blocked_local_attention` cuts the sequence into blocks and runs each block's queries
against their own block (causal) and the keys before it that are still in the window, in
PyTorch's fused CPU flash-attention kernel, merging the two softmaxes through their
log-sum-exps. It keeps for the backward pass what full causal attention keeps: q, k, v, the
output and one log-sum-exp per row. :func:`masked_blocked_local_attention` is the simpler
fallback (CUDA, dropout): padded key blocks and a boolean mask. :class:`~minifusion.attention.
Attention` chooses between them.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# The masked fallback for local heads (masked_blocked_local_attention: CUDA, dropout) uses
# query blocks of at least this many positions, and only for sequences of over two blocks.
_MIN_BLOCK = 64

#
# A local head at position t sees keys t − window + 1 … t. Cut the sequence into blocks of `b`
# positions (b = the window, at most _BLOCK). Query row r of block i (position i·b + r) sees
#
# * keys of its own block up to itself — plain causal attention inside the block: the
#   *diagonal* piece, b queries × b keys, which the kernel's causal flag handles;
# * keys of the blocks before it, those less than `window` positions back — the *band* piece:
#   b queries × the `reach · b` keys before the block (reach = ⌈(window − 1) / b⌉; 1 when
#   b = window), a triangle-shaped mask, the same for every block.
#
#     keys:      block i − 1        block i            b = window = 4, query rows r = 0 … 3
#     r = 0    . ■ ■ ■            ■ . . .
#     r = 1    . . ■ ■            ■ ■ . .
#     r = 2    . . . ■            ■ ■ ■ .
#     r = 3    . . . .            ■ ■ ■ ■
#              └─ band piece ─┘   └ diagonal piece ┘
#
# Each piece runs in PyTorch's fused CPU flash-attention kernel
# (`_scaled_dot_product_flash_attention_for_cpu`), which works tile by tile, never stores a
# score matrix, and returns each row's log-sum-exp L = log Σ exp(score). The two softmaxes of a
# row are then merged exactly:
#
#     L = log(e^L₁ + e^L₂),   out = e^(L₁ − L)·out₁ + e^(L₂ − L)·out₂
#
# (each outᵢ is already normalised by its own e^Lᵢ). A piece is a strided *view* of q, k, v —
# no padded or repeated copies — and the kernel handles GQA itself (query head h reads
# key/value head h // group).
#
# Backward: the kernel's own backward recomputes p = exp(score − L) tile by tile from q, k and
# L, and needs rowsum(grad_out · out). Handing each piece the *merged* out and L of its rows
# gives exactly that piece's share of the gradients (its p are entries of the whole row's
# softmax), so the two pieces' gradients simply add up. Autograd does not differentiate through
# L, so the whole thing is one `torch.autograd.Function` that saves q, k, v, out and L — what
# full causal flash attention saves too.

_aten_flash_forward = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None
)
_aten_flash_backward = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


@functools.cache
def cpu_flash_attention_works(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU flash-attention kernel runs for ``dtype`` in this process.

    On a CPU with AMX, PyTorch 2.13's kernel packs bf16 tiles for AMX whenever the CPU has it,
    and that packing then refuses to run ("pack_vnni2 is only supported when avx512 is
    supported") when ``ATEN_CPU_CAPABILITY`` caps the kernels below AVX-512: bf16 attention
    over more than a few dozen positions fails. One small call tells, once per dtype.
    """
    if _aten_flash_forward is None:
        return False
    probe = torch.zeros(1, 1, 128, 16, dtype=dtype)
    try:
        _aten_flash_forward(probe, probe, probe, 0.0, True, scale=1.0)
    except RuntimeError:
        return False
    return True


def _float32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def _flash_forward(q, k, v, dropout, causal, *, attn_mask=None, scale=None):
    """The CPU flash kernel's forward: ``(out, log-sum-exp)``. For a dtype it refuses
    (:func:`cpu_flash_attention_works`) it runs in fp32 and ``out`` comes back in ``q``'s
    dtype: the tensors the kernel would return, computed at a higher precision."""
    if cpu_flash_attention_works(q.dtype):
        return _aten_flash_forward(q, k, v, dropout, causal, attn_mask=attn_mask, scale=scale)
    out, lse = _aten_flash_forward(
        q.float(), k.float(), v.float(), dropout, causal, attn_mask=_float32(attn_mask),
        scale=scale,
    )  # fmt: skip
    return out.to(q.dtype), lse


def _flash_backward(grad_out, q, k, v, out, lse, dropout, causal, *, attn_mask=None, scale=None):
    """The CPU flash kernel's backward: ``(grad_q, grad_k, grad_v)``, in fp32 for a dtype the
    kernel refuses (as :func:`_flash_forward`), the gradients cast back to ``q``'s dtype."""
    if cpu_flash_attention_works(q.dtype):
        return _aten_flash_backward(
            grad_out, q, k, v, out, lse, dropout, causal, attn_mask=attn_mask, scale=scale
        )
    grads = _aten_flash_backward(
        grad_out.float(), q.float(), k.float(), v.float(), out.float(), lse, dropout, causal,
        attn_mask=_float32(attn_mask), scale=scale,
    )  # fmt: skip
    return tuple(grad.to(q.dtype) for grad in grads)


class _FlashAttention(torch.autograd.Function):
    """Causal or masked attention through :func:`_flash_forward` / :func:`_flash_backward`,
    saving for backward what the kernel saves: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, attn_mask, scale):
        out, lse = _flash_forward(q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.attn_mask, ctx.scale = is_causal, attn_mask, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _flash_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, ctx.is_causal,
            attn_mask=ctx.attn_mask, scale=ctx.scale,
        )  # fmt: skip
        return *grads, None, None, None


def sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype ``F.scaled_dot_product_attention`` computes ``q`` in: CPU autocast's, if on."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return q.dtype


def cpu_flash_fallback_applies(q: torch.Tensor, dropout: float) -> bool:
    """Whether ``F.scaled_dot_product_attention`` would hit a CPU flash kernel that refuses
    its dtype (:func:`cpu_flash_attention_works`): then :func:`flash_attention_in_float32`."""
    return _flash_blocks_apply(q, dropout) and not cpu_flash_attention_works(sdpa_dtype(q))


def flash_attention_in_float32(q, k, v, is_causal, attn_mask, scale) -> torch.Tensor:
    """SDPA without dropout on the CPU where the flash kernel refuses the dtype: the kernel in
    fp32, the result in the dtype SDPA would have used. ``q`` ``(B, h, T, D)``, ``k, v``
    ``(B, h_kv, S, D)``; ``attn_mask`` boolean (``True`` = visible) or additive, or ``None``."""
    dtype = sdpa_dtype(q)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        hidden = torch.zeros(attn_mask.shape, dtype=torch.float32, device=q.device)
        attn_mask = hidden.masked_fill_(~attn_mask, float("-inf"))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return _FlashAttention.apply(q, k, v, is_causal, attn_mask, scale)


# Longest query block. A longer window spans several blocks of keys per band; the band mask is
# block × reach·block floats (256 KiB for a window of 256).
_BLOCK = 256
# Most query rows — or, for a band, key rows — per kernel call whose results are new tensors
# then added or copied into place (every band call; diagonal calls too where they cannot be
# one call for the whole batch: key padding, a shorter last block). This bounds the memory a
# call adds on top of q, k, v and their gradients. Bigger calls are fewer and faster, above all
# on a busy machine: each call is a parallel region that waits for all its threads.
_ROWS_PER_CALL = 512


def _block_size(window: int) -> int:
    """Query block length: the window, at most ``_BLOCK``."""
    return min(window, _BLOCK)


@dataclass(frozen=True)
class _Blocks:
    """Rows ``start + j·stride + [0, size)`` for ``j < count`` along the time axis."""

    start: int
    count: int
    size: int
    stride: int

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """A view ``(count, h, size, …)`` of ``x`` ``(h, T, …)`` — no copy, even where the
        row ranges overlap (``size > stride``)."""
        rows = x.narrow(1, self.start, (self.count - 1) * self.stride + self.size)
        windows = rows.unfold(1, self.size, self.stride)  # (h, count, …, size)
        return windows.movedim(-1, 2).transpose(0, 1)

    def positions(self, device: torch.device) -> torch.Tensor:
        """Absolute positions ``(count, size)``."""
        first = self.start + self.stride * torch.arange(self.count, device=device)
        return first[:, None] + torch.arange(self.size, device=device)

    def split(self) -> list["_Blocks"]:
        """The same rows as pieces that do not overlap (``size ≤ stride``), to write into."""
        return [
            _Blocks(
                self.start + offset, self.count, min(self.stride, self.size - offset), self.stride
            )
            for offset in range(0, self.size, self.stride)
        ]


@dataclass(frozen=True)
class _Piece:
    """``count`` small attention problems of the same shape, one per query block."""

    queries: _Blocks
    keys: _Blocks
    causal: bool  # True: a diagonal piece (queries and keys are the same rows)

    def chunks(self, rows: int) -> list["_Piece"]:
        """The same problems, as many per piece as fit in ``rows`` key rows (at least one)."""
        per_piece = max(1, rows // self.keys.size)
        pieces = []
        for first in range(0, self.queries.count, per_piece):
            count = min(per_piece, self.queries.count - first)
            queries, keys = (
                _Blocks(b.start + first * b.stride, count, b.size, b.stride)
                for b in (self.queries, self.keys)
            )
            pieces.append(_Piece(queries, keys, self.causal))
        return pieces


def _plan(length: int, window: int, block: int) -> tuple[list[_Piece], list[_Piece]]:
    """The diagonal pieces and the band pieces covering ``length`` queries.

    Diagonal: every whole block as one piece, and a last, shorter block (where ``block`` does
    not divide ``length``) as another. Band: block 0 has none; blocks ``1 … reach − 1`` have
    fewer keys before them (the sequence starts) and are pieces of one block each; the other
    whole blocks are one piece; the shorter last block is its own. A band has at most
    ``window − 1`` rows: a block's row ``window − 1`` sees nothing before its block.
    """
    reach = math.ceil((window - 1) / block)
    whole, last = divmod(length, block)
    diagonal = []
    if whole:
        rows = _Blocks(0, whole, block, block)
        diagonal.append(_Piece(rows, rows, causal=True))
    if last:
        rows = _Blocks(whole * block, 1, last, block)
        diagonal.append(_Piece(rows, rows, causal=True))

    def band(first: int, count: int, size: int) -> _Piece:  # query blocks first … first+count−1
        key_start = max(0, (first - reach) * block)
        return _Piece(
            _Blocks(first * block, count, min(size, window - 1), block),
            _Blocks(key_start, count, first * block - key_start, block),
            causal=False,
        )

    bands = []
    if reach:  # window 1: every query sees only itself
        bands += [band(i, 1, block) for i in range(1, min(reach, whole))]
        if whole > reach:
            bands.append(band(reach, whole - reach, block))
        if last and whole:
            bands.append(band(whole, 1, last))
    return diagonal, bands


def _band_pattern(window: int, block: int, like: torch.Tensor) -> torch.Tensor:
    """The additive band mask of a block with all its keys: ``(1, 1, rows, keys)``.

    Row ``r`` (position ``s + r`` of a block starting at ``s``) against key ``c`` of the
    ``keys = reach · block`` positions before the block (position ``s − keys + c``): visible
    where ``c > keys + r − window``. A block near the start has fewer keys before it — the
    *last* columns — and a shorter last block fewer rows: both are slices of this one mask,
    which is built once per pass and broadcast over the blocks. The kernel wants a float mask of
    the query dtype: 0 = visible, −inf = hidden.
    """
    rows = min(block, window - 1)
    keys = math.ceil((window - 1) / block) * block
    row = torch.arange(rows, device=like.device)[:, None]
    column = torch.arange(keys, device=like.device)[None, :]
    hidden = column <= keys + row - window
    return like.new_zeros(rows, keys).masked_fill_(hidden, float("-inf"))[None, None]


def _piece_mask(
    piece: _Piece, window: int, key_valid: torch.Tensor | None, pattern: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The additive mask of a piece, ``(1 or count, 1, q_size, k_size)``, or ``None`` where the
    kernel's causal flag says it all; and the rows that see no key ``(count, q_size)``, or
    ``None`` where there are none (only key padding can empty a band row).

    Without key padding: ``None`` for the diagonal, a slice of ``pattern`` (the shared band mask)
    for a band. With key padding each piece gets its own mask from the definition — causal,
    within the window, and a padding key hidden unless it is the query itself.
    """
    if key_valid is None:
        if piece.causal:
            return None, None
        keys = pattern.shape[-1]
        return pattern[..., : piece.queries.size, keys - piece.keys.size :], None
    query_pos = piece.queries.positions(key_valid.device)[:, :, None]
    key_pos = piece.keys.positions(key_valid.device)[:, None, :]
    allowed = (key_pos <= query_pos) & (key_pos > query_pos - window)
    allowed &= key_valid[key_pos] | (key_pos == query_pos)
    mask = torch.zeros(allowed.shape, dtype=pattern.dtype, device=pattern.device)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None], ~allowed.any(dim=-1)


def _merge(
    out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor, other_lse: torch.Tensor
) -> None:
    """Fold a second partial softmax ``(other_out, other_lse)`` into ``(out, lse)``, in place.

    With ``L = log(e^lse + e^other_lse)`` the merged output is ``e^(lse − L)·out +
    e^(other_lse − L)·other_out = lerp(out, other_out, sigmoid(other_lse − lse))``.
    ``out`` ``(n, h, rows, D)``, ``lse`` ``(n, h, rows)`` fp32.
    """
    share = torch.sigmoid(other_lse - lse)[..., None]  # the second piece's part of each row
    if out.dtype == torch.float32:
        out.lerp_(other_out, share)
    else:  # bf16/fp16: blend in fp32, round once
        out.copy_(torch.lerp(out.float(), other_out.float(), share))
    torch.logaddexp(lse, other_lse, out=lse)


def _to_blocks(x: torch.Tensor, block: int) -> torch.Tensor | None:
    """``(B, h, T, …)`` → a view ``(B·T/block, h, block, …)`` with every batch entry's blocks
    in a row; ``None`` where ``block`` does not divide ``T`` or no such view exists."""
    batch, length = x.shape[0], x.shape[2]
    if length % block:
        return None
    blocks = x.unflatten(2, (length // block, block)).transpose(1, 2)  # (B, nb, h, block, …)
    if batch > 1 and blocks.stride(0) != blocks.shape[1] * blocks.stride(1):
        return None
    return blocks.flatten(0, 1)


def _from_blocks(blocks: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The inverse of :func:`_to_blocks` — a view, or ``None`` where the memory layout of
    ``blocks`` allows none."""
    x = blocks.unflatten(0, (batch, -1)).transpose(1, 2)  # (B, h, nb, block, …)
    if x.shape[3] > 1 and x.stride(2) != x.shape[3] * x.stride(3):
        return None
    return x.flatten(2, 3)


def _alias(view: torch.Tensor) -> torch.Tensor:
    """A tensor of its own (not a view) over ``view``'s memory, with its shape and strides."""
    alias = view.new_empty(0)
    return alias.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def _is_dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its memory span without gaps (then ``empty_like`` keeps
    its layout)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    return span == x.numel()


class _SlidingWindowAttention(torch.autograd.Function):
    """Block-wise flash attention for local heads (see :func:`blocked_local_attention`).

    ``forward(q (B, h, T, D), k, v (B, h_kv, T, D), window, scaling, key_valid (B, T) or None)``
    → ``(B, h, T, D)``. Saves q, k, v, the output and the per-row log-sum-exp ``(B, h, T)``;
    the backward pass recomputes each piece's scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, window, scaling, key_valid):
        batch, heads, length, head_dim = q.shape
        block = _block_size(window)
        diagonal, bands = _plan(length, window, block)
        pattern = _band_pattern(window, block, q)
        # 1. The diagonal pieces. Without key padding and with whole blocks, one kernel call
        # for every block of every sequence: its output, viewed back, *is* out.
        out = lse = None
        blocks = [_to_blocks(x, block) for x in (q, k, v)]
        if key_valid is None and all(x is not None for x in blocks):
            block_out, block_lse = _flash_forward(*blocks, 0.0, True, scale=scaling)
            out, lse = _from_blocks(block_out, batch), _from_blocks(block_lse, batch)
            if out is not None:  # the same memory, as a tensor of its own rather than a view:
                # autograd forbids in-place changes to a custom Function's outputs that are views
                out = _alias(out)
        if out is None or lse is None:
            # Time-major memory (B, T, h, D), like the kernel's own output: the caller's
            # transpose(1, 2).reshape(B, T, h·D) is then free.
            time_major = (length * heads * head_dim, head_dim, heads * head_dim, 1)
            out = q.new_empty_strided((batch, heads, length, head_dim), time_major)
            lse = q.new_empty(batch, length, heads, dtype=torch.float32).transpose(1, 2)
            for b in range(batch):
                valid = None if key_valid is None else key_valid[b]
                for whole in diagonal:
                    for piece in whole.chunks(_ROWS_PER_CALL):
                        mask, _ = _piece_mask(piece, window, valid, pattern)
                        rows = piece.queries
                        piece_out, piece_lse = _flash_forward(
                            rows.of(q[b]), rows.of(k[b]), rows.of(v[b]),
                            0.0, mask is None, attn_mask=mask, scale=scaling,
                        )  # fmt: skip
                        rows.of(out[b]).copy_(piece_out)
                        rows.of(lse[b]).copy_(piece_lse)
        # 2. The band pieces, merged into out and lse in place.
        for b in range(batch):
            valid = None if key_valid is None else key_valid[b]
            for whole in bands:
                for piece in whole.chunks(_ROWS_PER_CALL):
                    mask, empty = _piece_mask(piece, window, valid, pattern)
                    rows, keys = piece.queries, piece.keys
                    band_out, band_lse = _flash_forward(
                        rows.of(q[b]), keys.of(k[b]), keys.of(v[b]),
                        0.0, False, attn_mask=mask, scale=scaling,
                    )  # fmt: skip
                    if empty is not None:  # the kernel reports lse 0, not −inf, for such rows
                        band_lse.masked_fill_(empty[:, None], float("-inf"))
                    _merge(rows.of(out[b]), rows.of(lse[b]), band_out, band_lse)
        ctx.save_for_backward(q, k, v, out, lse, key_valid)
        ctx.window, ctx.scaling = window, scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_valid = ctx.saved_tensors
        window, scaling = ctx.window, ctx.scaling
        if grad_out.stride(-1) != 1:  # e.g. the expanded gradient of a .sum()
            grad_out = grad_out.contiguous()
        batch = q.shape[0]
        block = _block_size(window)
        diagonal, bands = _plan(q.shape[2], window, block)
        pattern = _band_pattern(window, block, q)
        # 1. The diagonal pieces write the gradients. In one call where the forward pass could:
        # the kernel returns gradients laid out like its inputs, so — when those are dense —
        # they, viewed back, *are* grad_q, grad_k, grad_v.
        grads = None
        blocks = [_to_blocks(x, block) for x in (grad_out, q, k, v, out, lse)]
        if key_valid is None and all(x is not None and _is_dense(x) for x in blocks[1:4]):
            if all(x is not None for x in blocks):
                block_grads = _flash_backward(*blocks, 0.0, True, scale=scaling)
                grads = [_from_blocks(x, batch) for x in block_grads]
        if grads is None or any(x is None for x in grads):
            grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
            for b in range(batch):
                valid = None if key_valid is None else key_valid[b]
                for whole in diagonal:
                    for piece in whole.chunks(_ROWS_PER_CALL):
                        _piece_backward(piece, window, valid, pattern, scaling, b, grad_out,
                                        q, k, v, out, lse, grads)  # fmt: skip
        # 2. The band pieces add their shares.
        for b in range(batch):
            valid = None if key_valid is None else key_valid[b]
            for whole in bands:
                for piece in whole.chunks(_ROWS_PER_CALL):
                    _piece_backward(piece, window, valid, pattern, scaling, b, grad_out,
                                    q, k, v, out, lse, grads)  # fmt: skip
        return *grads, None, None, None


def _piece_backward(
    piece: _Piece,
    window: int,
    key_valid: torch.Tensor | None,
    pattern: torch.Tensor,
    scaling: float,
    b: int,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grads: list[torch.Tensor],
) -> None:
    """Batch entry ``b``'s share of the gradients from one piece: written into ``grads``
    (``[grad_q, grad_k, grad_v]``) by a diagonal piece, added by a band piece.

    One key/value head (with its query heads) per call: the gradients a call returns are new
    tensors, alive until they are in place — this halves them with two key/value heads.
    """
    mask, _ = _piece_mask(piece, window, key_valid, pattern)
    rows, keys = piece.queries, piece.keys
    group = q.shape[1] // k.shape[1]
    for kv_head in range(k.shape[1]):
        h = slice(kv_head * group, (kv_head + 1) * group)
        kv = slice(kv_head, kv_head + 1)
        dq, dk, dv = _flash_backward(
            rows.of(grad_out[b, h]), rows.of(q[b, h]), keys.of(k[b, kv]), keys.of(v[b, kv]),
            rows.of(out[b, h]), rows.of(lse[b, h]), 0.0, mask is None,
            attn_mask=mask, scale=scaling,
        )  # fmt: skip
        grad_q, grad_k, grad_v = (x[b, s] for x, s in zip(grads, (h, kv, kv)))
        if piece.causal:
            rows.of(grad_q).copy_(dq)
            keys.of(grad_k).copy_(dk)
            keys.of(grad_v).copy_(dv)
        else:
            rows.of(grad_q).add_(dq)
            # Consecutive blocks' band keys overlap, and an in-place add must not write one
            # element twice: add them `stride` rows at a time.
            for part in keys.split():
                columns = slice(part.start - keys.start, part.start - keys.start + part.size)
                part.of(grad_k).add_(dk[:, :, columns])
                part.of(grad_v).add_(dv[:, :, columns])
        del dq, dk, dv  # before the next call's arrive


def _flash_blocks_apply(q: torch.Tensor, dropout: float) -> bool:
    """Whether local heads can take the flash-block route (CPU kernel, which has no dropout);
    the same kernel, in fp32 where it refuses the dtype, serves global heads there too."""
    return q.device.type == "cpu" and dropout == 0.0 and _aten_flash_backward is not None


def blocked_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scaling: float,
    dropout: float = 0.0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window causal attention in ``O(T · window)`` time, keeping for the backward pass
    only what full causal attention keeps.

    ``q`` ``(B, h, T, D)``, ``k, v`` ``(B, h_kv, T, D)`` (``h`` a multiple of ``h_kv``) starting
    at position 0, ``key_valid`` ``(B, T)`` (``False`` = padding; a padding query still sees
    itself) → ``(B, h, T, D)``. Query ``t`` sees keys ``t − window + 1 … t``.

    On the CPU without dropout: blocks of ``b = min(window, 256)`` positions. Each block's
    queries attend to their own block (causal) and, separately, to the keys before the block
    that are still in their window (a triangle-shaped band), in PyTorch's flash kernel, and the
    two softmaxes are merged through their log-sum-exps (see the "sliding-window heads" comment
    in this module). The kernel reads strided *views* of q, k, v, and the backward pass keeps
    only q, k, v, the output and one log-sum-exp per row ``(B, h, T)`` — the scores are
    recomputed block by block, as FlashAttention does. That is what full causal flash attention
    keeps, so local heads need no more memory than global ones, in ``T · window`` time instead
    of ``T²``.

    The simpler way, :func:`masked_blocked_local_attention` — copy each block's keys and values
    together with the ``window − 1`` positions before it (overlapping, padded, repeated for each
    query head of a GQA group) and hand SDPA a mask of ``T × (block + window − 1)`` — keeps those
    copies and that mask for the backward pass: more than twice the memory of full causal
    attention at the benchmark's sizes. It remains the fallback where the CPU flash kernel does
    not apply: on CUDA, and with dropout > 0 (the CPU flash kernel has none; SDPA then takes its
    math path, which also keeps every block's scores).
    """
    if _flash_blocks_apply(q, dropout):
        return _SlidingWindowAttention.apply(q, k, v, window, scaling, key_valid)
    return masked_blocked_local_attention(q, k, v, window, scaling, dropout, key_valid)


def masked_blocked_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scaling: float,
    dropout: float = 0.0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fallback of :func:`blocked_local_attention`: padded key blocks and a boolean mask.

    The ``T`` queries are cut into blocks of ``c = max(window, 64)``. A block's queries can only
    see keys from ``window − 1`` positions before the block up to its end, so each block attends
    to ``c + window − 1`` keys instead of all ``T`` — but those key/value blocks are copies
    (overlapping, padded, and repeated for each query head of a GQA group) and the mask covers
    every block's ``c × (c + window − 1)`` pairs, all kept for the backward pass. ``q``
    ``(B, h, T, D)``, ``k, v`` ``(B, h_kv, T, D)`` starting at position 0 → ``(B, h, T, D)``.
    """
    batch, heads, length, head_dim = q.shape
    block = max(window, _MIN_BLOCK)
    num_blocks = math.ceil(length / block)
    right_pad = num_blocks * block - length
    span = block + window - 1  # keys one block can see
    repeats = heads // k.shape[1]

    def key_blocks(x: torch.Tensor) -> torch.Tensor:  # (B, h_kv, T, D) → (B·nb, h, span, D)
        x = F.pad(x, (0, 0, window - 1, right_pad))
        x = x.unfold(2, span, block).permute(0, 2, 1, 4, 3)  # (B, nb, h_kv, span, D)
        x = x.repeat_interleave(repeats, dim=2) if repeats > 1 else x
        return x.reshape(batch * num_blocks, heads, span, head_dim)

    # Four-dimensional inputs with a boolean mask let PyTorch use its fused kernels.
    q_blocks = F.pad(q, (0, 0, 0, right_pad)).view(batch, heads, num_blocks, block, head_dim)
    q_blocks = q_blocks.transpose(1, 2).reshape(batch * num_blocks, heads, block, head_dim)

    # Query i of block b is at b·c + i; key j of its span is at b·c − (window − 1) + j.
    offsets = torch.arange(num_blocks, device=q.device)[:, None, None] * block
    query_pos = offsets + torch.arange(block, device=q.device)[None, :, None]
    key_pos = offsets - (window - 1) + torch.arange(span, device=q.device)[None, None, :]
    allowed = (key_pos <= query_pos) & (key_pos > query_pos - window) & (key_pos >= 0)
    mask = allowed[None].expand(batch, -1, -1, -1)  # (B, nb, c, span)
    if key_valid is not None:
        valid = F.pad(key_valid.bool(), (window - 1, right_pad), value=False)
        valid = valid.unfold(1, span, block)  # (B, nb, span)
        mask = mask & (valid[:, :, None, :] | (key_pos == query_pos)[None])
    mask = mask.reshape(batch * num_blocks, 1, block, span)

    out = F.scaled_dot_product_attention(
        q_blocks, key_blocks(k), key_blocks(v), attn_mask=mask, dropout_p=dropout, scale=scaling
    )  # (B·nb, h, c, D)
    out = out.view(batch, num_blocks, heads, block, head_dim).transpose(1, 2)
    return out.reshape(batch, heads, num_blocks * block, head_dim)[:, :, :length]
