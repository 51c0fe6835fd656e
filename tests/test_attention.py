"""Attention: parity with transformers' LlamaAttention, the sliding-window definition against an
explicit reference, cached decoding == full forward, causality, and the bounded local cache."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention

import minifusion.attention as attention_module
import minifusion.local_attention as local_attention_module
from minifusion.attention import (
    Attention,
    blocked_local_attention,
    build_attention_mask,
    eager_attention,
)
from minifusion.config import MiniFusionConfig
from minifusion.rope import RotaryEmbedding

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# (name, heads, kv_heads, head_dim): MHA, GQA with 3 query heads per KV head, MQA
SHAPES = [("mha", 4, 4, 16), ("gqa3", 6, 2, 24), ("mqa", 4, 1, 32)]


def make_config(heads=4, kv_heads=2, head_dim=16, impl="sdpa", **overrides) -> MiniFusionConfig:
    return MiniFusionConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attention_impl=impl,
        max_position_embeddings=1024,
        **overrides,
    )


def make_pair(config: MiniFusionConfig, seed: int = 0) -> tuple[Attention, RotaryEmbedding]:
    torch.manual_seed(seed)
    attention = Attention(config)
    with torch.no_grad():  # non-zero biases so they are exercised too
        for name, parameter in attention.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return attention, RotaryEmbedding(config)


def positions(batch: int, length: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + length)[None].expand(batch, -1)


def run(attention, rope, x, mask=None, impl=None):
    if impl is not None:
        attention.impl = impl
    return attention(x, rope(positions(x.shape[0], x.shape[1])), attention_mask=mask)


# ----------------------------------------------------------------- parity with transformers ---
@pytest.mark.parametrize("name, heads, kv_heads, head_dim", SHAPES)
@pytest.mark.parametrize("rope", [DEFAULT_ROPE, YARN], ids=["default", "yarn"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_llama_attention(name, heads, kv_heads, head_dim, rope, impl):
    bias = name == "gqa3"
    config = make_config(heads, kv_heads, head_dim, impl, rope_parameters=dict(rope),
                         attention_bias=bias)  # fmt: skip
    attention, rope_module = make_pair(config)
    reference_config = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=bias,
        max_position_embeddings=1024,
        rope_parameters=dict(rope),
    )
    reference_config._attn_implementation = "eager"
    reference = LlamaAttention(reference_config, layer_idx=0)
    reference.load_state_dict(attention.state_dict())  # same parameter names

    batch, length = 2, 48
    x = torch.randn(batch, length, config.hidden_size)
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, :5] = 0  # the second sequence is left-padded
    cos_sin = rope_module(positions(batch, length))
    allowed = build_attention_mask(length, length, key_valid=padding.bool())
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    ours = attention(x, cos_sin, attention_mask=padding)
    theirs, _ = reference(x, position_embeddings=cos_sin, attention_mask=additive)
    real = padding.bool()
    assert (ours - theirs)[real].abs().max() <= 1e-5

    ours_causal = attention(x, cos_sin)  # no padding: the mask-free fast path
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    theirs_causal, _ = reference(x, position_embeddings=cos_sin, attention_mask=causal)
    assert (ours_causal - theirs_causal).abs().max() <= 1e-5


@pytest.mark.parametrize("name, heads, kv_heads, head_dim", SHAPES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_qk_norm_matches_qwen3_attention(name, heads, kv_heads, head_dim, impl):
    """QK-norm: transformers' Qwen3Attention normalises each head's query and key over head_dim
    (gains q_norm, k_norm; the same parameter names) before RoPE — an independent reference."""
    config = make_config(heads, kv_heads, head_dim, impl, attention_qk_norm=True,
                         rms_norm_eps=1e-6, rope_parameters=dict(DEFAULT_ROPE))  # fmt: skip
    attention, rope_module = make_pair(config)
    with torch.no_grad():  # gains away from 1, so a skipped or misplaced gain shows
        attention.q_norm.weight.normal_(1.0, 0.2)
        attention.k_norm.weight.normal_(1.0, 0.2)
    reference_config = Qwen3Config(
        hidden_size=config.hidden_size, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=1024,
        rope_parameters=dict(DEFAULT_ROPE), num_hidden_layers=1,
    )  # fmt: skip
    reference_config._attn_implementation = "eager"
    reference = Qwen3Attention(reference_config, layer_idx=0)
    reference.load_state_dict(attention.state_dict())  # q/k/v/o_proj, q_norm, k_norm

    batch, length = 2, 40
    x = torch.randn(batch, length, config.hidden_size)
    cos_sin = rope_module(positions(batch, length))
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    theirs, _ = reference(x, position_embeddings=cos_sin, attention_mask=causal)
    assert (attention(x, cos_sin) - theirs).abs().max() <= 1e-5
    # the norms matter: without them the same weights give another output
    plain = Attention(make_config(heads, kv_heads, head_dim, impl))
    plain.load_state_dict(attention.state_dict(), strict=False)
    assert (plain(x, cos_sin) - theirs).abs().max() > 1e-3


def test_qk_norm_parameters_are_counted_and_the_cache_stays_exact():
    config = make_config(4, 2, 16, num_global_heads=2, sliding_window=5, attention_qk_norm=True)
    attention, rope = make_pair(config)
    counted = config._attention_parameters()
    assert counted["q_norm"] == counted["k_norm"] == 16
    assert sum(counted.values()) == sum(p.numel() for p in attention.parameters())
    x = torch.randn(2, 17, config.hidden_size)
    with torch.no_grad():
        full = run(attention, rope, x)
        cache = attention.new_cache()
        pieces = [attention(x[:, :6], rope(positions(2, 6)), kv_cache=cache)]
        for t in range(6, 17):  # the cache holds normalised, rotated keys
            pieces.append(attention(x[:, t : t + 1], rope(positions(2, 1, t)), kv_cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def qwen3_next_state(attention: Attention) -> dict[str, torch.Tensor]:
    """Our gated attention's weights in Qwen3-Next's layout: its q_proj emits, head by head, the
    query's head_dim rows and then the gate's; its RMSNorm scales by (1 + weight)."""
    heads, d = attention.num_heads, attention.head_dim
    state = dict(attention.state_dict())
    query = state.pop("q_proj.weight").view(heads, d, -1)
    gate = state.pop("g_proj.weight").view(heads, d, -1)
    state["q_proj.weight"] = torch.cat([query, gate], dim=1).reshape(2 * heads * d, -1)
    state["q_norm.weight"] = state["q_norm.weight"] - 1
    state["k_norm.weight"] = state["k_norm.weight"] - 1
    return state


@pytest.mark.parametrize("name, heads, kv_heads, head_dim", SHAPES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_output_gate_matches_qwen3_next_attention(name, heads, kv_heads, head_dim, impl):
    """Gated attention: transformers' Qwen3NextAttention multiplies every head's output by the
    sigmoid of a projection of the layer's input before o_proj (with QK-norm, as ours here)."""
    config = make_config(heads, kv_heads, head_dim, impl, attention_qk_norm=True,
                         attention_output_gate=True, rms_norm_eps=1e-6,
                         rope_parameters=dict(DEFAULT_ROPE))  # fmt: skip
    attention, rope_module = make_pair(config)
    with torch.no_grad():  # gains away from 1; gate logits of order 1, so sigmoid is not ~0.5
        attention.q_norm.weight.normal_(1.0, 0.2)
        attention.k_norm.weight.normal_(1.0, 0.2)
        attention.g_proj.weight.normal_(0.0, 1.0 / math.sqrt(config.hidden_size))
    reference_config = Qwen3NextConfig(
        hidden_size=config.hidden_size, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=1024, num_hidden_layers=1,
    )  # fmt: skip
    reference_config._attn_implementation = "eager"
    reference = Qwen3NextAttention(reference_config, layer_idx=0)
    reference.load_state_dict(qwen3_next_state(attention))

    batch, length = 2, 40
    x = torch.randn(batch, length, config.hidden_size)
    cos_sin = rope_module(positions(batch, length))  # full-width rotary, given to both
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    theirs, _ = reference(x, position_embeddings=cos_sin, attention_mask=causal)
    assert (attention(x, cos_sin) - theirs).abs().max() <= 1e-5
    # the gate matters: the same weights without it give another output
    ungated = Attention(make_config(heads, kv_heads, head_dim, impl, attention_qk_norm=True))
    ungated.load_state_dict(attention.state_dict(), strict=False)
    assert (ungated(x, cos_sin) - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_output_gate_parameters_are_counted_and_the_cache_stays_exact(bias):
    config = make_config(4, 2, 16, num_global_heads=2, sliding_window=5, attention_bias=bias,
                         attention_output_gate=True)  # fmt: skip
    attention, rope = make_pair(config)
    counted = config._attention_parameters()
    assert counted["g_proj"] == 64 * 64 + (64 if bias else 0)  # hidden → every head's channels
    assert sum(counted.values()) == sum(p.numel() for p in attention.parameters())
    # one more hidden × hidden matmul per token in every attention layer: 2 FLOPs per weight
    plain = make_config(4, 2, 16, num_global_heads=2, sliding_window=5, attention_bias=bias)
    layers = sum(mixer in ("attention", "hybrid") for mixer in config.mixer_types)
    added = (config.flops_breakdown(32)["attention_projections"]
             - plain.flops_breakdown(32)["attention_projections"])  # fmt: skip
    assert layers > 0 and added == pytest.approx(layers * 2 * 64 * 64)
    x = torch.randn(2, 17, config.hidden_size)
    with torch.no_grad():
        full = run(attention, rope, x)
        cache = attention.new_cache()
        pieces = [attention(x[:, :6], rope(positions(2, 6)), kv_cache=cache)]
        for t in range(6, 17):  # the gate reads only the current token: nothing to cache
            pieces.append(attention(x[:, t : t + 1], rope(positions(2, 1, t)), kv_cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


# ------------------------------------------------------------ explicit sliding-window reference ---
def explicit_reference(attention: Attention, x, cos, sin, key_valid=None) -> torch.Tensor:
    """Head by head, query by query: softmax over exactly the keys the definition allows."""
    from minifusion.rope import apply_rotary

    batch, length, _ = x.shape
    d = attention.head_dim
    q = attention.q_proj(x).view(batch, length, -1, d).transpose(1, 2)
    k = attention.k_proj(x).view(batch, length, -1, d).transpose(1, 2)
    v = attention.v_proj(x).view(batch, length, -1, d).transpose(1, 2)
    q, k = apply_rotary(q, k, cos, sin)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(attention.num_heads):
            kv = h // attention.group_size  # query head h reads key/value head h // group
            local = h >= attention.num_global_heads
            for t in range(length):
                first = max(0, t - attention.window + 1) if local else 0
                keys = [j for j in range(first, t + 1) if key_valid is None or key_valid[b, j]]
                keys = keys or [t]  # a padding query only sees itself
                scores = q[b, h, t] @ k[b, kv, keys].T / math.sqrt(d)
                out[b, h, t] = torch.softmax(scores, dim=-1) @ v[b, kv, keys]
    return attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


HEAD_MIXES = {  # (num_global_heads, sliding_window)
    "global": (6, None),
    "local": (0, 5),
    "mixed": (3, 5),
}


def mixed_layer(mix: str, impl: str = "sdpa", kv_heads: int = 2, head_dim: int = 8):
    """Six query heads (3 per KV head by default) laid out as HEAD_MIXES[mix]."""
    global_heads, window = HEAD_MIXES[mix]
    config = make_config(6, kv_heads, head_dim, impl, num_global_heads=global_heads,
                         sliding_window=window)  # fmt: skip
    return (config, *make_pair(config))


@pytest.mark.parametrize("mix", list(HEAD_MIXES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("length", [12, 200])  # 200 > 2 blocks: the blocked local path
def test_matches_explicit_window_reference(mix, impl, length):
    config, attention, rope = mixed_layer(mix, impl)
    x = torch.randn(2, length, config.hidden_size)
    padding = torch.ones(2, length, dtype=torch.long)
    padding[0, :3] = 0
    cos, sin = rope(positions(2, length))
    with torch.no_grad():
        for mask in (None, padding):
            ours = attention(x, (cos, sin), attention_mask=mask)
            reference = explicit_reference(attention, x, cos, sin, mask)
            assert (ours - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [1, 4, 70])
def test_a_local_head_sees_exactly_window_keys_itself_included(window):
    mask = build_attention_mask(100, 100, window=window)[0, 0]
    seen = mask.sum(dim=-1)
    assert seen.tolist() == [min(t + 1, window) for t in range(100)]
    assert mask.diagonal().all()  # its own position is one of them

    # The module agrees: a token `window` positions back is invisible, `window − 1` back is not.
    config = make_config(4, 4, 8, num_global_heads=0, sliding_window=window)
    attention, rope = make_pair(config)
    length, t = 160, 150
    x = torch.randn(1, length, config.hidden_size)
    with torch.no_grad():
        base = run(attention, rope, x)[0, t]
        outside, inside = x.clone(), x.clone()
        outside[0, t - window] += 1.0
        inside[0, t - window + 1] += 1.0
        assert torch.equal(run(attention, rope, outside)[0, t], base)
        assert not torch.allclose(run(attention, rope, inside)[0, t], base)


# ------------------------------------------------------------------------ sdpa == eager ---
@pytest.mark.parametrize("mix", list(HEAD_MIXES))
def test_sdpa_and_eager_agree_with_gradients(mix):
    config, attention, rope = mixed_layer(mix, head_dim=12)
    x = torch.randn(2, 300, config.hidden_size, requires_grad=True)
    padding = torch.ones(2, 300, dtype=torch.long)
    padding[1, :17] = 0
    results = {}
    for impl in ("sdpa", "eager"):
        attention.zero_grad()
        x.grad = None
        out = run(attention, rope, x, padding, impl)
        (out * padding[..., None]).square().sum().backward()
        results[impl] = (out.detach(), x.grad.clone(), attention.q_proj.weight.grad.clone())
    for ours, reference in zip(results["sdpa"], results["eager"]):
        assert (ours - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


# ---------------------------------------------------------- block-wise local attention ---
def local_inputs(batch, heads, kv_heads, length, head_dim=16, dtype=torch.float32):
    """q ``(B, h, T, D)``, k, v ``(B, h_kv, T, D)`` in the layer's time-major memory layout."""

    def make(h):
        return torch.randn(batch, length, h, head_dim).to(dtype).transpose(1, 2)

    return make(heads), make(kv_heads), make(kv_heads)


def padding_mask(batch, length, window):
    """Sequence 0 left-padded for more than a window (whole band rows see only padding),
    the last sequence with a hole of padding in the middle."""
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, : min(length, window + 3)] = False
    valid[-1, length // 2 : length // 2 + window // 2 + 1] = False
    return valid


def local_vs_eager(q, k, v, window, key_valid=None):
    """Output and q/k/v gradients of blocked_local_attention and of the eager reference (fp32)."""
    length, scaling = q.shape[2], q.shape[-1] ** -0.5
    grad_out = torch.randn(q.shape)
    mask = build_attention_mask(length, length, window=window, key_valid=key_valid)
    results = []
    for impl in ("blocked", "eager"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if impl == "blocked":
            out = blocked_local_attention(*leaves, window, scaling, 0.0, key_valid)
        else:
            out = eager_attention(*(x.float() for x in leaves), mask, scaling)
        out.backward(grad_out.to(out.dtype))
        results.append([out.float()] + [x.grad.float() for x in leaves])
    return results


@pytest.mark.parametrize(
    "length, window",
    [(300, 64), (256, 64), (37, 5), (20, 1), (64, 64), (50, 64)],
    ids=["T%window!=0", "T%window==0", "small-window", "window-1", "window=T", "window>T"],
)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["group1", "group2"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "key-padding"])
@pytest.mark.parametrize("small_blocks", [False, True], ids=["default-blocks", "small-blocks"])
def test_blocked_local_attention_equals_eager_with_gradients(
    length, window, kv_heads, padded, small_blocks, monkeypatch
):
    if small_blocks:
        # Blocks shorter than the window (bands spanning several key blocks, overlapping from
        # one query block to the next) and many kernel calls per sequence, with their seams.
        monkeypatch.setattr(local_attention_module, "_BLOCK", 4)
        monkeypatch.setattr(local_attention_module, "_ROWS_PER_CALL", 10)
    torch.manual_seed(length + window + kv_heads)
    q, k, v = local_inputs(2, 4, kv_heads, length)
    key_valid = padding_mask(2, length, window) if padded else None
    ours, reference = local_vs_eager(q, k, v, window, key_valid)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_blocked_local_attention_bf16_is_close_to_fp32_eager():
    torch.manual_seed(0)
    q, k, v = local_inputs(2, 4, 2, 300, head_dim=32, dtype=torch.bfloat16)
    ours, reference = local_vs_eager(q, k, v, 64, padding_mask(2, 300, 64))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
        assert (a - b).abs().max() <= 3e-2 * max(1.0, b.abs().max().item()), name


class LargestNewTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation returns (a dispatch mode
    sees every ATen operation, the fused kernels' included, forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "key-padding"])
def test_blocked_local_attention_creates_and_saves_nothing_of_size_t_squared(padded):
    """Forward and backward create no tensor larger than the queries, and the backward pass
    keeps only O(T) tensors — where eager attention's scores are B·h·T·T."""
    batch, heads, kv_heads, length, window = 1, 4, 2, 1024, 64
    q, k, v = (x.requires_grad_() for x in local_inputs(batch, heads, kv_heads, length))
    key_valid = padding_mask(batch, length, window) if padded else None
    scores = batch * heads * length * length  # 4 Mi elements; q has 64 Ki
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with LargestNewTensor() as forward:
            out = blocked_local_attention(q, k, v, window, 0.25, 0.0, key_valid)
    assert out.grad_fn.name() == "_SlidingWindowAttentionBackward"
    with LargestNewTensor() as backward:
        out.backward(torch.randn(out.shape))
    assert max(forward.largest, backward.largest) <= q.numel() < scores / 32
    assert max(saved) <= q.numel() and sum(saved) <= 4 * q.numel()  # q, k, v, out, lse

    # The same probes do see eager attention's score matrix.
    saved.clear()
    mask = build_attention_mask(length, length, window=window, key_valid=key_valid)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with LargestNewTensor() as eager:
            eager_attention(q, k, v, mask, 0.25)
    assert eager.largest >= scores and max(saved) >= scores


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_local_layer_keeps_no_score_matrix_for_backward(impl):
    """The whole layer with every head local: what it saves for backward is O(T · hidden)."""
    config = make_config(4, 2, 16, impl, num_global_heads=0, sliding_window=32)
    attention, rope = make_pair(config)
    length = 1024
    x = torch.randn(1, length, config.hidden_size, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(attention, rope, x)
    if impl == "sdpa":
        assert max(saved) <= x.numel()
    else:  # the reference keeps its scores: the probe would notice
        assert max(saved) >= length * length


def test_local_heads_with_dropout_take_the_masked_fallback():
    """The CPU flash kernel has no dropout: training with attention dropout falls back to
    masked blocks, which still train; in eval mode the fused blocks are back."""
    config = make_config(4, 2, 8, num_global_heads=0, sliding_window=16, attention_dropout=0.5)
    attention, rope = make_pair(config)
    x = torch.randn(2, 200, config.hidden_size, requires_grad=True)

    def graph_names(tensor):  # the names of every autograd node behind `tensor`
        seen, stack = set(), [tensor.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack.extend(next_node for next_node, _ in node.next_functions)
        return {node.name() for node in seen}

    attention.train()
    dropped = run(attention, rope, x)
    dropped.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert "_SlidingWindowAttentionBackward" not in graph_names(dropped)
    attention.eval()
    kept = run(attention, rope, x)
    assert "_SlidingWindowAttentionBackward" in graph_names(kept)
    assert not torch.allclose(dropped, kept)
    assert (kept - run(attention, rope, x, impl="eager")).abs().max() <= 1e-5


class FlashDtypes(TorchDispatchMode):
    """The dtypes of the queries every CPU flash-attention call (forward or backward) gets."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "flash_attention_for_cpu" in func.__name__:
            self.dtypes.add(args[1].dtype if "backward" in func.__name__ else args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def flash_kernel_refuses_bf16(monkeypatch):
    """The CPU flash kernel raising for bf16 as PyTorch 2.13's does on an AMX CPU whose kernels
    ``ATEN_CPU_CAPABILITY`` caps below AVX-512 (the probe's answer is cached per dtype)."""
    kernel = local_attention_module._aten_flash_forward

    def refuse_bf16(q, *args, **kwargs):
        if q.dtype == torch.bfloat16:
            raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")
        return kernel(q, *args, **kwargs)

    works = local_attention_module.cpu_flash_attention_works
    works.cache_clear()
    monkeypatch.setattr(local_attention_module, "_aten_flash_forward", refuse_bf16)
    yield
    works.cache_clear()


def bf16_layer_run(mix, autocast):
    """A mixed layer's bf16 output and input gradient over 300 positions, and the fp32 eager
    reference's; bf16 either as autocast or as the weights' dtype."""
    config, attention, rope = mixed_layer(mix, head_dim=12)
    x = torch.randn(2, 300, config.hidden_size)
    reference_x = x.clone().requires_grad_()
    reference = run(attention, rope, reference_x, impl="eager")
    reference.square().sum().backward()
    low = x.clone().requires_grad_()
    with FlashDtypes() as flash, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        layer = attention if autocast else attention.to(torch.bfloat16)
        out = run(layer, rope, low if autocast else low.bfloat16(), impl="sdpa")
        out.float().square().sum().backward()
    return (out.float(), low.grad.float()), (reference, reference_x.grad), flash.dtypes


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
@pytest.mark.parametrize("mix", list(HEAD_MIXES))
def test_bf16_attention_where_the_flash_kernel_refuses_bf16(mix, autocast, flash_kernel_refuses_bf16):
    """Every head, global and local, still runs the flash kernel, in fp32, and the result is
    the fp32 reference's within bf16's precision."""
    assert not local_attention_module.cpu_flash_attention_works(torch.bfloat16)
    assert local_attention_module.cpu_flash_attention_works(torch.float32)
    (out, grad), (reference, reference_grad), flash_dtypes = bf16_layer_run(mix, autocast)
    assert flash_dtypes == {torch.float32}
    assert out.dtype == grad.dtype == torch.float32
    assert (out - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert (grad - reference_grad).abs().max() <= 3e-2 * reference_grad.abs().max()


def test_bf16_attention_runs_with_kernels_capped_at_avx2():
    """A fresh interpreter with ``ATEN_CPU_CAPABILITY=avx2``: bf16 local and global heads over
    300 positions, forward and backward (on an AMX CPU this is where the flash kernel refuses;
    elsewhere the kernel runs and the check is the same)."""
    script = """
import torch
from minifusion.attention import Attention
from minifusion.config import MiniFusionConfig
from minifusion.rope import RotaryEmbedding
config = MiniFusionConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                          num_global_heads=3, sliding_window=64, max_position_embeddings=1024)
torch.manual_seed(0)
attention, rope = Attention(config).to(torch.bfloat16), RotaryEmbedding(config)
x = torch.randn(2, 300, 96, dtype=torch.bfloat16, requires_grad=True)
cos_sin = tuple(t.to(torch.bfloat16) for t in rope(torch.arange(300)[None].expand(2, -1)))
out = attention(x, cos_sin)
out.float().square().sum().backward()
assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
print("ok")
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ------------------------------------------------------------------- cached decoding ---
@pytest.mark.parametrize("mix", list(HEAD_MIXES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cached_decoding_equals_full_forward_at_every_split(mix, impl):
    config, attention, rope = mixed_layer(mix, impl)
    length = 23  # several times the window
    x = torch.randn(2, length, config.hidden_size)
    with torch.no_grad():
        full = run(attention, rope, x)
        for split in range(1, length):
            cache = attention.new_cache()
            pieces = [attention(x[:, :split], rope(positions(2, split)), kv_cache=cache)]
            for t in range(split, length):
                pieces.append(attention(x[:, t : t + 1], rope(positions(2, 1, t)), kv_cache=cache))
            assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5, split


@pytest.mark.parametrize("mix", list(HEAD_MIXES))
def test_chunked_prefill_and_left_padding_with_cache(mix):
    """Chunks longer than the window, and a left-padded batch, through the cache."""
    config, attention, rope = mixed_layer(mix, head_dim=8)
    length = 40
    x = torch.randn(2, length, config.hidden_size)
    padding = torch.ones(2, length, dtype=torch.long)
    padding[0, :6] = 0
    # positions as generate() builds them: count real tokens, pads parked at 0
    position_ids = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = attention(x, rope(position_ids), attention_mask=padding)
        cache = attention.new_cache()
        pieces, start = [], 0
        for size in (9, 1, 13, 2, 15):
            end = start + size
            pieces.append(
                attention(
                    x[:, start:end],
                    rope(position_ids[:, start:end]),
                    attention_mask=padding[:, :end],
                    kv_cache=cache,
                )
            )
            start = end
    real = padding.bool()
    assert (torch.cat(pieces, dim=1) - full)[real].abs().max() <= 1e-5


def test_local_cache_memory_is_bounded_by_the_window():
    config = make_config(4, 2, 8, num_global_heads=2, sliding_window=6)
    attention, rope = make_pair(config)
    cache = attention.new_cache()
    ring_storages, global_capacity = set(), []
    with torch.no_grad():
        for t in range(200):
            x = torch.randn(1, 1, config.hidden_size)
            attention(x, rope(positions(1, 1, t)), kv_cache=cache)
            ring_storages.add(cache._ring_k.untyped_storage().data_ptr())
            global_capacity.append(cache._global_k.shape[2])
    assert cache.seen_tokens == 200
    assert cache.global_keys.shape == (1, 1, 200, 8)  # global heads keep everything
    assert cache.local_keys.shape == (1, 1, 6, 8)  # local heads keep the last window
    assert len(ring_storages) == 1  # one ring, allocated once, written in place
    # the global buffer grew 64 positions at a time (an eighth of its size is less), not per token
    assert sorted(set(global_capacity)) == [1, 65, 129, 193, 257]
    per_token = 2 * 1 * 8 * 4  # K and V, one KV head, head_dim 8, fp32
    assert cache.memory_bytes() == global_capacity[-1] * per_token + 6 * per_token


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_single_query_attention_equals_eager_with_padding(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 8)
    k, v = torch.randn(3, kv_heads, 10, 8), torch.randn(3, kv_heads, 10, 8)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, :4] = False  # row 1: padded keys
    valid[2, :] = False  # row 2: a padding query, whose own key (index 6) it still sees
    got = attention_module.single_query_attention(q, k, v, 0.3, valid, newest=6)
    visible = valid.clone()
    visible[:, 6] = True
    expected = eager_attention(q, k, v, visible[:, None, None, :], 0.3)
    torch.testing.assert_close(got, expected)
    plain = attention_module.single_query_attention(q, k, v, 0.3)
    torch.testing.assert_close(plain, eager_attention(q, k, v, torch.ones(1, 1, 1, 10).bool(), 0.3))


def test_a_reserved_cache_never_reallocates():
    config = make_config(4, 2, 8, num_global_heads=2, sliding_window=6)
    attention, rope = make_pair(config)
    cache = attention.new_cache()
    cache.reserve(30)
    with torch.no_grad():
        attention(torch.randn(1, 10, config.hidden_size), rope(positions(1, 10)), kv_cache=cache)
        storage = cache._global_k.untyped_storage().data_ptr()
        for t in range(10, 30):
            x = torch.randn(1, 1, config.hidden_size)
            attention(x, rope(positions(1, 1, t)), kv_cache=cache)
            assert cache._global_k.untyped_storage().data_ptr() == storage
    assert cache._global_k.shape[2] == 30


@pytest.mark.parametrize("mix", ["local", "mixed"])
def test_single_token_steps_over_a_full_ring_respect_padding_inside_the_window(mix):
    """Row 0 is left-padded with pads that stay inside the window while the ring is full and
    wraps: the permuted padding mask must still hide them."""
    config, attention, rope = mixed_layer(mix, head_dim=8)  # window 5
    length, prompt = 16, 6
    x = torch.randn(2, length, config.hidden_size)
    padding = torch.ones(2, length, dtype=torch.long)
    padding[0, :4] = 0
    position_ids = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = attention(x, rope(position_ids), attention_mask=padding)
        cache = attention.new_cache()
        pieces = [attention(x[:, :prompt], rope(position_ids[:, :prompt]),
                            attention_mask=padding[:, :prompt], kv_cache=cache)]  # fmt: skip
        for t in range(prompt, length):
            pieces.append(
                attention(x[:, t : t + 1], rope(position_ids[:, t : t + 1]),
                          attention_mask=padding[:, : t + 1], kv_cache=cache)
            )  # fmt: skip
    real = padding.bool()
    assert (torch.cat(pieces, dim=1) - full)[real].abs().max() <= 1e-5


# ------------------------------------------------------------------------- causality ---
@pytest.mark.parametrize("mix", list(HEAD_MIXES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causality(mix, impl):
    config, attention, rope = mixed_layer(mix, impl)
    length = 300
    x = torch.randn(1, length, config.hidden_size)
    with torch.no_grad():
        base = run(attention, rope, x)
        for t in (0, 150, 299):
            changed = x.clone()
            changed[0, t] = torch.randn(config.hidden_size)
            out = run(attention, rope, changed)
            assert torch.equal(out[0, :t], base[0, :t]), t
            assert not torch.allclose(out[0, t], base[0, t])


# ------------------------------------------------------------------------- GQA = MHA ---
def test_gqa_equals_mha_with_duplicated_key_value_heads():
    """Query head h reads key/value head h // group: copying each KV head `group` times into an
    MHA layer gives the same function (so GQA with one query head per group *is* MHA)."""
    gqa_config = make_config(6, 2, 8)
    mha_config = make_config(6, 6, 8)
    gqa, rope = make_pair(gqa_config)
    mha, _ = make_pair(mha_config)
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):
        heads = state[name].view(2, 8, -1)
        state[name] = heads.repeat_interleave(3, dim=0).reshape(6 * 8, -1)
    mha.load_state_dict(state)
    x = torch.randn(2, 20, gqa_config.hidden_size)
    with torch.no_grad():
        assert (run(gqa, rope, x) - run(mha, rope, x)).abs().max() <= 1e-5


def test_mask_of_the_wrong_length_names_the_fix():
    config = make_config(4, 2, 8)
    attention, rope = make_pair(config)
    cache = attention.new_cache()
    x = torch.randn(1, 5, config.hidden_size)
    attention(x, rope(positions(1, 5)), kv_cache=cache)
    with pytest.raises(ValueError, match="mask of all tokens so far"):
        attention(
            x[:, :1], rope(positions(1, 1, 5)), attention_mask=torch.ones(1, 1), kv_cache=cache
        )


# ---------------------------------------------------------------------------- on a GPU ---
@pytest.mark.gpu
@pytest.mark.parametrize("mix", list(HEAD_MIXES))
def test_cuda_sdpa_matches_cpu_eager(mix):
    """The fused CUDA kernels (fp32 and bf16) agree with the CPU reference path."""
    config, attention, rope = mixed_layer(mix, head_dim=16)
    x = torch.randn(2, 300, config.hidden_size)
    padding = torch.ones(2, 300, dtype=torch.long)
    padding[1, :9] = 0
    with torch.no_grad():
        reference = run(attention, rope, x, padding, "eager")
        attention, rope = attention.cuda(), rope.cuda()
        cuda_fp32 = run(attention, rope, x.cuda(), padding.cuda(), "sdpa").cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cuda_bf16 = run(attention, rope, x.cuda(), padding.cuda(), "sdpa").float().cpu()
    real = padding.bool()
    assert (cuda_fp32 - reference)[real].abs().max() <= 1e-4
    assert (cuda_bf16 - reference)[real].abs().max() <= 5e-2
