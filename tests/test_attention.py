"""Attention: parity with transformers' LlamaAttention, the sliding-window definition against an
explicit reference, cached decoding == full forward, causality, and the bounded local cache."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from minifusion.attention import Attention, build_attention_mask
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
    local_bytes = []
    with torch.no_grad():
        for t in range(50):
            x = torch.randn(1, 1, config.hidden_size)
            attention(x, rope(positions(1, 1, t)), kv_cache=cache)
            local = cache.local_keys
            local_bytes.append(local.untyped_storage().nbytes() * 2)  # keys + values
    assert cache.seen_tokens == 50
    assert cache.global_keys.shape == (1, 1, 50, 8)  # global heads keep everything
    assert cache.local_keys.shape == (1, 1, 6, 8)  # local heads keep the last window
    assert max(local_bytes[6:]) == local_bytes[6]  # the storage itself stops growing
    per_token = 2 * 1 * 8 * 4  # K and V, one KV head, head_dim 8, fp32
    assert cache.memory_bytes() == 50 * per_token + 6 * per_token


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
