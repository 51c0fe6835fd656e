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

Two implementations, chosen by ``config.attention_impl``: ``"sdpa"`` calls PyTorch's fused
``F.scaled_dot_product_attention`` (and, for long sequences, computes local heads block by
block so their cost grows with ``T · window`` instead of ``T²``); ``"eager"`` is the explicit
matmul → mask → softmax → matmul reference. They agree to float rounding (tested).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniFusionConfig
from .rope import apply_rotary

__all__ = ["Attention", "LayerKVCache", "build_attention_mask", "repeat_kv"]

# Local heads are computed block by block only when blocks can be reasonably large.
_MIN_BLOCK = 64


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

    Global heads keep every key: ``global_keys`` is ``(B, Hkv_global, seen_tokens, D)``. Local
    heads keep only the last ``window`` keys — the only ones a future query can still see — so
    ``local_keys`` is ``(B, Hkv_local, min(seen_tokens, window), D)`` and its memory is bounded.
    """

    def __init__(self, window: int | None = None):
        self.window = window
        self.global_keys: torch.Tensor | None = None
        self.global_values: torch.Tensor | None = None
        self.local_keys: torch.Tensor | None = None
        self.local_values: torch.Tensor | None = None
        self.seen_tokens = 0

    def update_global(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new ``(B, Hkv_global, T, D)`` keys/values; return all of them so far."""
        if self.global_keys is not None:
            keys = torch.cat((self.global_keys, keys), dim=2)
            values = torch.cat((self.global_values, values), dim=2)
        self.global_keys, self.global_values = _owned(keys), _owned(values)
        return keys, values

    def update_local(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prepend the kept window to the new keys/values, return them with the absolute
        position of their first key, and keep only the last ``window`` for next time."""
        if self.window is None:
            raise ValueError("LayerKVCache(window=None) has no local heads to cache.")
        first_position = self.seen_tokens
        if self.local_keys is not None:
            first_position -= self.local_keys.shape[2]
            keys = torch.cat((self.local_keys, keys), dim=2)
            values = torch.cat((self.local_values, values), dim=2)
        if keys.shape[2] > self.window:
            # clone: a slice would keep the whole concatenated tensor alive
            self.local_keys = keys[:, :, -self.window :].clone()
            self.local_values = values[:, :, -self.window :].clone()
        else:
            self.local_keys, self.local_values = _owned(keys), _owned(values)
        return keys, values, first_position

    def advance(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens have been processed (after both updates)."""
        self.seen_tokens += num_tokens

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values."""
        tensors = (self.global_keys, self.global_values, self.local_keys, self.local_values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch (beam search keeps the best beams)."""
        for name in ("global_keys", "global_values", "local_keys", "local_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it is all of its storage, else a copy of just its elements.

    The prompt's keys are a slice of the projection of every head (local ones included);
    keeping that slice would keep the whole projection alive, more than the cache reports.
    """
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


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
        self.num_global_heads = config.num_global_heads
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
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype))

        outputs = []
        g_q, g_kv = self.num_global_heads, self.num_global_kv_heads
        if self.num_global_heads:
            keys, values = k[:, :g_kv], v[:, :g_kv]
            if kv_cache is not None:
                keys, values = kv_cache.update_global(keys, values)
            outputs.append(self._attend(q[:, :g_q], keys, values, past, 0, None, key_valid))
        if self.num_local_heads:
            keys, values, key_start = k[:, g_kv:], v[:, g_kv:], past
            if kv_cache is not None:
                keys, values, key_start = kv_cache.update_local(keys, values)
            local_valid = None if key_valid is None else key_valid[:, key_start:]
            outputs.append(
                self._attend(q[:, g_q:], keys, values, past, key_start, self.window, local_valid)
            )
        if kv_cache is not None:
            kv_cache.advance(length)

        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
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
    ) -> torch.Tensor:
        """Attention of queries ``(B, h, T, D)`` over keys/values ``(B, h_kv, S, D)``."""
        dropout = self.dropout if self.training else 0.0
        query_len, key_len = q.shape[2], k.shape[2]

        def mask() -> torch.Tensor:
            return build_attention_mask(
                query_len, key_len, query_start=query_start, key_start=key_start,
                window=window, key_valid=key_valid, device=q.device,
            )  # fmt: skip

        if self.impl == "eager":
            return eager_attention(q, k, v, mask(), self.scaling, dropout, self.training)

        no_past = query_start == key_start == 0 and query_len == key_len
        if window is not None and no_past and query_len > 2 * max(window, _MIN_BLOCK):
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


def blocked_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scaling: float,
    dropout: float = 0.0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window causal attention in ``O(T · window)`` time and memory.

    The ``T`` queries are cut into blocks of ``c = max(window, 64)``. A block's queries can only
    see keys from ``window − 1`` positions before the block up to its end, so each block attends
    to ``c + window − 1`` keys instead of all ``T``. ``q`` ``(B, h, T, D)``, ``k, v``
    ``(B, h_kv, T, D)`` starting at position 0 → ``(B, h, T, D)``.
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
