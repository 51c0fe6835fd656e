"""Chapter 06 — causal self-attention: GQA, RoPE, global + local heads, and a windowed KV cache.

Attention lets every token look back at the tokens before it and take a weighted average of
what they carry. Each query head scores all visible keys (``q·k / sqrt(head_dim)``), turns the
scores into weights with a softmax, and mixes the matching values.

* **GQA** (Ainslie et al., 2023): ``num_key_value_heads`` key/value heads are shared by groups of
  ``num_attention_heads / num_key_value_heads`` query heads. One group per query head is plain
  multi-head attention (MHA); one key/value head for all is multi-query attention (MQA). Fewer
  key/value heads shrink the KV cache by the same factor.
* **Global and local heads.** The first ``num_global_heads`` query heads are *global*: full
  causal attention. The rest are *local*: causal attention over a sliding window. **A local head
  at position ``t`` sees exactly the keys at positions ``t − window + 1 … t`` — ``window`` keys,
  its own position included** (fewer near the start of the sequence). A global head at ``t``
  sees all ``t + 1`` keys ``0 … t``. This is the same convention as transformers' sliding-window
  masks (``key > query − window``).
* **KV cache.** When generating one token at a time, keys and values of past tokens never
  change, so they are kept (:class:`LayerKVCache`). Global heads need all of them; local heads
  never look further back than the window, so their cache keeps only the last ``window`` keys —
  its memory stops growing once the sequence is longer than the window.

Two implementations, chosen by ``config.attention_impl``. ``"eager"`` is the explicit
matmul → mask → softmax → matmul reference: it builds the whole ``T × T`` score matrix and keeps
it for the backward pass. ``"sdpa"`` uses PyTorch's fused flash-attention kernels, which work
tile by tile and keep only q, k, v, the output and one log-sum-exp per query row:

* global heads: ``F.scaled_dot_product_attention`` with its built-in causal mask;
* local heads (:func:`blocked_local_attention`): the sequence is cut into blocks of ``window``
  positions (at most 256); each block's queries attend to their own block (causal) and to the
  keys before it that are still in the window (a triangle), in two fused calls whose softmaxes
  are merged through their log-sum-exps. The cost grows like ``T · window`` instead of ``T²``,
  and what is kept for the backward pass is what full causal attention keeps — no score
  matrix, no padded or repeated copies of the keys. (On the CPU without dropout; elsewhere a
  masked block-by-block fallback.)

The two implementations agree to float rounding (tested).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .config import MiniFusionConfig
from .rope import apply_rotary
from .utils import as_dtype

__all__ = ["Attention", "LayerKVCache", "build_attention_mask", "repeat_kv"]

# The masked fallback for local heads (masked_blocked_local_attention: CUDA, dropout) uses
# query blocks of at least this many positions, and only for sequences of over two blocks.
_MIN_BLOCK = 64
# Sequence length from which local heads go block-wise through the CPU flash kernel.
_BLOCKWISE_FROM = 512


def repeat_kv(states: torch.Tensor, repeats: int) -> torch.Tensor:
    """``(B, Hkv, S, D)`` → ``(B, Hkv·repeats, S, D)``: each key/value head serves ``repeats``
    consecutive query heads (query head ``h`` uses key/value head ``h // repeats``)."""
    if repeats == 1:
        return states
    batch, kv_heads, length, head_dim = states.shape
    expanded = states[:, :, None].expand(batch, kv_heads, repeats, length, head_dim)
    return expanded.reshape(batch, kv_heads * repeats, length, head_dim)


def build_attention_mask(
    query_len: int,
    key_len: int,
    *,
    query_start: int = 0,
    key_start: int = 0,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: a boolean ``(B or 1, 1, query_len, key_len)``.

    Queries sit at absolute positions ``query_start + i``, keys at ``key_start + j``. Allowed:
    ``key ≤ query`` (causal) and, with a ``window``, ``key > query − window`` (so ``window``
    keys, the query's own included). ``key_valid`` ``(B, key_len)`` marks real tokens (``False``
    = padding); a padding *query* is let to see itself so its softmax row is never empty
    (its output is ignored anyway).
    """
    query_pos = query_start + torch.arange(query_len, device=device)[:, None]
    key_pos = key_start + torch.arange(key_len, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)
    allowed = allowed[None, None]
    if key_valid is not None:
        is_self = (key_pos == query_pos)[None, None]
        allowed = allowed & (key_valid[:, None, None, :].bool() | is_self)
    return allowed


class LayerKVCache:
    """Keys and values one attention layer has already computed, for incremental decoding.

    Global heads keep every key, in a buffer ``(B, Hkv_global, capacity, D)`` that is filled in
    place and, when full, replaced by one an eighth larger (at least ``_GROWTH_MIN`` positions):
    a new token costs one write, not a copy of the whole past as ``torch.cat`` would, and the
    buffer never holds more than about 1/8 unused. :meth:`reserve` allocates the final size at
    once when the length is known (a ``HybridCache(..., max_length=)``).

    Local heads keep only the last ``window`` keys — the only ones a future query can still see —
    in a *ring*: ``(B, Hkv_local, window, D)``, where the key of position ``p`` sits in slot
    ``p mod window``. One new token overwrites the oldest slot; its query sees every key in the
    ring, and since attention sums over keys the order of the slots does not matter (RoPE was
    applied to each key before it was stored). Several new tokens at once (a prompt, a chunk)
    take the ordered path: the window is unrolled, the new keys appended, and the ring refilled
    with the last ``window`` of them.

    ``global_keys`` / ``local_keys`` (and the values) show what is held, oldest key first.
    """

    def __init__(self, window: int | None = None):
        self.window = window
        self._global_k: torch.Tensor | None = None  # (B, Hkv_global, capacity, D)
        self._global_v: torch.Tensor | None = None
        self._ring_k: torch.Tensor | None = None  # (B, Hkv_local, window, D)
        self._ring_v: torch.Tensor | None = None
        self._reserved = 0  # global positions to allocate at the first write (reserve())
        self.seen_tokens = 0

    # ------------------------------------------------------------------------- global ---
    def reserve(self, total_tokens: int) -> None:
        """Allocate room for ``total_tokens`` global keys at the first write (no growth later)."""
        self._reserved = max(self._reserved, int(total_tokens))

    def update_global(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``(B, Hkv_global, T, D)`` keys/values after the ones already held;
        return views of all of them so far, ``(B, Hkv_global, seen + T, D)``."""
        start, end = self.seen_tokens, self.seen_tokens + keys.shape[2]
        if self._global_k is None or end > self._global_k.shape[2]:
            self._grow_global(keys, end)
        self._global_k[:, :, start:end] = keys
        self._global_v[:, :, start:end] = values
        return self._global_k[:, :, :end], self._global_v[:, :, :end]

    def _grow_global(self, like: torch.Tensor, needed: int) -> None:
        old = 0 if self._global_k is None else self._global_k.shape[2]
        capacity = max(needed, self._reserved)
        if old:  # growing while decoding: leave room for the tokens still to come
            capacity = max(capacity, old + max(_GROWTH_MIN, old // 8))
        shape = (*like.shape[:2], capacity, like.shape[3])
        new_k, new_v = like.new_empty(shape), like.new_empty(shape)
        if old:
            new_k[:, :, : self.seen_tokens] = self._global_k[:, :, : self.seen_tokens]
            new_v[:, :, : self.seen_tokens] = self._global_v[:, :, : self.seen_tokens]
        self._global_k, self._global_v = new_k, new_v

    # -------------------------------------------------------------------------- local ---
    def update_local(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """Add the new ``(B, Hkv_local, T, D)`` keys/values to the window.

        Returns ``(keys, values, first_position, in_slot_order)``. For several new tokens, or
        while the ring is not yet full, the keys are in order, starting at absolute position
        ``first_position``, and ``in_slot_order`` is False. For one new token with a full ring,
        the keys are the ring itself, in slot order, every one of them inside the new query's
        window (:meth:`slot_positions` says which position each slot holds, for padding masks).
        """
        if self.window is None:
            raise ValueError("LayerKVCache(window=None) has no local heads to cache.")
        held = min(self.seen_tokens, self.window)
        new = keys.shape[2]
        if new == 1 and self._ring_k is not None:
            slot = self.seen_tokens % self.window
            self._ring_k[:, :, slot : slot + 1] = keys
            self._ring_v[:, :, slot : slot + 1] = values
            if held < self.window:  # not yet wrapped: slots 0 … seen are in order
                end = held + 1
                return self._ring_k[:, :, :end], self._ring_v[:, :, :end], 0, False
            return self._ring_k, self._ring_v, self.seen_tokens + 1 - self.window, True
        first_position = self.seen_tokens - held
        if held:
            keys = torch.cat((self.local_keys, keys), dim=2)
            values = torch.cat((self.local_values, values), dim=2)
        self._refill_ring(keys, values, self.seen_tokens + new)
        return keys, values, first_position, False

    def slot_positions(self, device: torch.device) -> torch.Tensor:
        """``(window,)``: the absolute position each slot of the full ring holds, right after
        :meth:`update_local` wrote the newest token (before :meth:`advance`)."""
        slots = torch.arange(self.window, device=device)
        newest = self.seen_tokens
        return newest - (newest - slots) % self.window

    def _refill_ring(self, keys: torch.Tensor, values: torch.Tensor, total: int) -> None:
        """Store the last ``window`` of ordered ``keys`` (which end at position ``total − 1``)
        in their slots."""
        if self._ring_k is None:
            shape = (*keys.shape[:2], self.window, keys.shape[3])
            self._ring_k, self._ring_v = keys.new_zeros(shape), values.new_zeros(shape)
        kept = min(self.window, keys.shape[2])
        positions = torch.arange(total - kept, total, device=keys.device)
        slots = positions % self.window
        self._ring_k[:, :, slots] = keys[:, :, -kept:]
        self._ring_v[:, :, slots] = values[:, :, -kept:]

    # ------------------------------------------------------------------ what it holds ---
    @property
    def global_keys(self) -> torch.Tensor | None:
        """``(B, Hkv_global, seen_tokens, D)``: every key of the global heads."""
        return None if self._global_k is None else self._global_k[:, :, : self.seen_tokens]

    @property
    def global_values(self) -> torch.Tensor | None:
        return None if self._global_v is None else self._global_v[:, :, : self.seen_tokens]

    @property
    def local_keys(self) -> torch.Tensor | None:
        """``(B, Hkv_local, min(seen_tokens, window), D)``: the window, oldest key first."""
        return self._ordered(self._ring_k)

    @property
    def local_values(self) -> torch.Tensor | None:
        return self._ordered(self._ring_v)

    def _ordered(self, ring: torch.Tensor | None) -> torch.Tensor | None:
        if ring is None:
            return None
        held = min(self.seen_tokens, self.window)
        if held < self.window:
            return ring[:, :, :held]
        oldest = self.seen_tokens % self.window  # slot of the oldest key still in the window
        return torch.cat((ring[:, :, oldest:], ring[:, :, :oldest]), dim=2)

    def buffers(self) -> list[torch.Tensor]:
        """The tensors this cache allocated (what :meth:`memory_bytes` counts)."""
        tensors = (self._global_k, self._global_v, self._ring_k, self._ring_v)
        return [t for t in tensors if t is not None]

    def advance(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens have been processed (after both updates)."""
        self.seen_tokens += num_tokens

    def memory_bytes(self) -> int:
        """Bytes allocated for keys and values (a global buffer's spare room included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch (beam search keeps the best beams)."""
        for name in ("_global_k", "_global_v", "_ring_k", "_ring_v"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))


# A global buffer that runs out grows by an eighth of its size, and by at least this many positions.
_GROWTH_MIN = 64


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE and global + local heads.

    ``forward(hidden_states (B, T, C), position_embeddings=(cos, sin) each (B, T, head_dim))``
    → ``(B, T, C)``. Optional ``attention_mask`` ``(B, past + T)`` with 1 for real tokens and 0
    for padding (the Hugging Face convention, covering cached tokens too), and ``kv_cache`` — a
    :class:`LayerKVCache` that is read and extended in place.
    """

    def __init__(self, config: MiniFusionConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.group_size = self.num_heads // self.num_kv_heads
        self.num_global_heads = config.global_heads_of(layer_idx)
        self.num_local_heads = self.num_heads - self.num_global_heads
        # the config guarantees num_global_heads is a multiple of the group size
        self.num_global_kv_heads = self.num_global_heads // self.group_size
        self.window = config.sliding_window if self.num_local_heads else None
        self.impl = config.attention_impl
        self.dropout = config.attention_dropout
        self.scaling = self.head_dim**-0.5

        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(self.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, self.hidden_size, bias=bias)

    def new_cache(self) -> LayerKVCache:
        return LayerKVCache(window=self.window)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        past = kv_cache.seen_tokens if kv_cache is not None else 0
        key_valid = self._key_valid(attention_mask, batch, past + length)

        def heads(projection: nn.Linear) -> torch.Tensor:  # (B, T, H·D) → (B, H, T, D)
            return projection(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        # (cos, sin), or XPos's (cos_q, sin_q, cos_k, sin_k)
        q, k = apply_rotary(q, k, *(as_dtype(table, q.dtype) for table in position_embeddings))

        outputs = []
        g_q, g_kv = self.num_global_heads, self.num_global_kv_heads
        q_global = q_local = q
        k_global = k_local = k
        v_global = v_local = v
        if self.num_global_heads and self.num_local_heads:
            # One split per tensor rather than two slices: the split's backward writes both
            # parts' gradients into one tensor, where each slice would allocate its own
            # zero-filled full-size gradient and then add them up.
            q_global, q_local = q.split((g_q, self.num_local_heads), dim=1)
            k_global, k_local = k.split((g_kv, self.num_kv_heads - g_kv), dim=1)
            v_global, v_local = v.split((g_kv, self.num_kv_heads - g_kv), dim=1)
        if self.num_global_heads:
            keys, values = k_global, v_global
            if kv_cache is not None:
                keys, values = kv_cache.update_global(keys, values)
            outputs.append(self._attend(q_global, keys, values, past, 0, None, key_valid))
        if self.num_local_heads:
            keys, values, key_start, in_slot_order = k_local, v_local, past, False
            if kv_cache is not None:
                keys, values, key_start, in_slot_order = kv_cache.update_local(keys, values)
            window, local_valid, newest = self.window, key_valid, -1
            if in_slot_order:  # one new token over a full ring: every slot is in its window
                window, newest = None, past % self.window
                if key_valid is not None:
                    local_valid = key_valid[:, kv_cache.slot_positions(key_valid.device)]
            elif key_valid is not None:
                local_valid = key_valid[:, key_start:]
            outputs.append(
                self._attend(q_local, keys, values, past, key_start, window, local_valid, newest)
            )
        if kv_cache is not None:
            kv_cache.advance(length)

        # (B, h, T, D) each → (B, T, H·D). The fused kernels return time-major memory, so for one
        # kind of head the transpose + reshape is free; for both, one concatenation copies.
        outputs = [out.transpose(1, 2) for out in outputs]  # (B, T, h, D)
        out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out)

    # --------------------------------------------------------------------------- helpers ---
    def _key_valid(
        self, attention_mask: torch.Tensor | None, batch: int, total: int
    ) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, "
                f"{total}) = (batch, cached tokens + new tokens) with 1 for real tokens and 0 for "
                "padding. When decoding with a cache, pass the mask of all tokens so far."
            )
        valid = attention_mask.bool()
        if attention_mask.device.type == "cpu" and bool(valid.all()):
            return None  # nothing is padded: take the mask-free fast path
        return valid

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_start: int,
        key_start: int,
        window: int | None,
        key_valid: torch.Tensor | None,
        newest: int = -1,
    ) -> torch.Tensor:
        """Attention of queries ``(B, h, T, D)`` over keys/values ``(B, h_kv, S, D)``.

        ``newest``: for one query, the index of its own key among the keys (the last one,
        except in a wrapped ring of local keys)."""
        dropout = self.dropout if self.training else 0.0
        query_len, key_len = q.shape[2], k.shape[2]

        def mask() -> torch.Tensor:
            return build_attention_mask(
                query_len, key_len, query_start=query_start, key_start=key_start,
                window=window, key_valid=key_valid, device=q.device,
            )  # fmt: skip

        if self.impl == "eager":
            return eager_attention(q, k, v, mask(), self.scaling, dropout, self.training)
        # A decode step: the keys end at the query (a window, if any, is already applied), so
        # only padding can hide a key.
        if query_len == 1 and dropout == 0.0 and (window is None or window >= key_len):
            return single_query_attention(q, k, v, self.scaling, key_valid, newest)

        no_past = query_start == key_start == 0 and query_len == key_len
        # Local heads whose window cuts something off: block by block (blocked_local_attention)
        # once the sequence is long enough to repay its several kernel calls — from
        # _BLOCKWISE_FROM positions on the CPU (it never builds a T × T mask), or once there are
        # a few blocks. Shorter sequences take one masked SDPA call: at T = 128, window 64 (the
        # `tiny` training shape) that is about 1.35× faster than the block route, and its
        # T × T mask is small.
        long_enough = query_len >= _BLOCKWISE_FROM and _flash_blocks_apply(q, dropout)
        if (
            window is not None
            and no_past
            and window < query_len
            and (long_enough or query_len > 2 * max(window, _MIN_BLOCK))
        ):
            return blocked_local_attention(q, k, v, window, self.scaling, dropout, key_valid)
        # Keys always end at the newest query, so a window ≥ key_len cuts nothing off.
        only_causal = key_valid is None and (window is None or window >= key_len)
        # Plain causal: SDPA's built-in mask (its fastest kernels). After a cache, one new token
        # sees every key and needs no mask at all.
        is_causal = only_causal and no_past
        needs_mask = not only_causal or (not no_past and query_len > 1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask() if needs_mask else None, dropout_p=dropout,
            is_causal=is_causal, scale=self.scaling, enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip


def single_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    newest: int = -1,
) -> torch.Tensor:
    """One query per sequence over keys it may all see — a decode step — with plain matmuls.

    ``q (B, h, 1, D)``, ``k, v (B, h_kv, S, D)``; ``key_valid (B, S)`` hides padded keys, except
    the query's own key at index ``newest`` (a padding query sees itself, as in
    :func:`build_attention_mask`). For one query row, SDPA's fused CPU kernel spends far more
    on setting up its blocks than on the arithmetic (about 150 µs against 10–20 µs for these
    four operations at the ``tiny`` size), and the step runs once per layer and token.
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    # query heads sharing a KV head sit next to each other: (B, h_kv, group, D)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, k.transpose(2, 3)) * scaling  # (B, h_kv, group, S)
    if key_valid is not None:
        visible = key_valid.clone()
        visible[:, newest] = True
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    weights = as_dtype(torch.softmax(scores, dim=-1, dtype=torch.float32), q.dtype)
    return torch.matmul(weights, v).reshape(batch, heads, 1, dim)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The reference: ``softmax(q·kᵀ·scaling masked) · v`` with explicit matmuls.

    ``q`` ``(B, h, T, D)``, ``k, v`` ``(B, h_kv, S, D)``, boolean ``mask`` broadcastable to
    ``(B, h, T, S)``. The softmax runs in fp32.
    """
    repeats = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, repeats), repeat_kv(v, repeats)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v)


# ------------------------------------------------------------------ sliding-window heads ---
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

_flash_forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)

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
    """Whether local heads can take the flash-block route (CPU kernel, which has no dropout)."""
    return q.device.type == "cpu" and dropout == 0.0 and _flash_backward is not None


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
