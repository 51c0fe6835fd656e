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
  masked block-by-block fallback; both live in :mod:`minifusion.local_attention`.)

The two implementations agree to float rounding (tested).
"""


import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniFusionConfig
from .local_attention import (
    _MIN_BLOCK,
    _flash_blocks_apply,
    blocked_local_attention,
    cpu_flash_fallback_applies,
    flash_attention_in_float32,
)
from .norm import RMSNorm
from .rope import apply_rotary
from .utils import as_dtype

__all__ = ["Attention", "LayerKVCache", "build_attention_mask", "repeat_kv"]

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
        # QK-norm: one RMSNorm over head_dim for all query heads, one for all key heads (Qwen3's
        # placement: on each head's vector, before RoPE, so the cache holds normalised keys)
        self.q_norm = self.k_norm = None
        if config.attention_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # Output gate: one sigmoid per head channel, computed from the layer's input, scales what
        # each head hands to o_proj (Qwen3-Next's gate; it folds it into q_proj's output)
        self.g_proj = (
            nn.Linear(self.hidden_size, q_size, bias=bias) if config.attention_output_gate else None
        )

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
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
        if self.g_proj is not None:
            out = out * torch.sigmoid(self.g_proj(hidden_states))
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
        if cpu_flash_fallback_applies(q, dropout):  # a CPU whose flash kernel refuses bf16
            return flash_attention_in_float32(
                q, k, v, is_causal, mask() if needs_mask else None, self.scaling
            )
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
