"""The shared cache-memory helpers of ``MiniFusionConfig``: ``cache_breakdown`` against a live
:class:`HybridCache` (measured with ``minifusion.inference.cache_bytes`` and ``memory_bytes()``),
and ``cache_crossover`` against a brute-force search."""

import pytest
import torch

from minifusion import MiniFusionConfig
from minifusion.cache import HybridCache
from minifusion.inference import cache_bytes, full_attention_config
from minifusion.model import MiniFusionForCausalLM

from .test_model import small_config

CONFIGS = {
    "attention-only, all heads global": dict(
        mixer_types=["attention"] * 2, ffn_types=["dense"] * 2, sliding_window=None,
        num_global_heads=None,
    ),
    "attention-only, local heads": dict(mixer_types=["attention"] * 2, ffn_types=["dense"] * 2),
    "mamba-only": dict(mixer_types=["mamba"] * 2, ffn_types=["none"] * 2),
    "hybrid, local heads": dict(mixer_types=["hybrid"] * 2, ffn_types=["dense"] * 2),
    "interleaved, global heads in one layer": dict(
        mixer_types=["attention", "mamba", "hybrid", "mamba"], ffn_types=["dense"] * 4,
        global_attention_layers=[2],
    ),
    "every head local": dict(
        mixer_types=["hybrid", "attention"], ffn_types=["dense"] * 2, num_global_heads=0,
    ),
}  # fmt: skip


def config_of(name: str) -> MiniFusionConfig:
    overrides = CONFIGS[name]
    return small_config(num_hidden_layers=len(overrides["mixer_types"]), **overrides)


def live_cache(config: MiniFusionConfig, tokens: int, batch_size: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(config).to(dtype).eval()
    cache = HybridCache(model.model, batch_size=batch_size)
    with torch.no_grad():
        model(torch.randint(1, 61, (batch_size, tokens)), past_key_values=cache)
    return cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 4, 13])  # shorter than the window of 6, and longer
@pytest.mark.parametrize(("dtype", "size"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_breakdown_equals_a_live_cache(name, tokens, dtype, size):
    config = config_of(name)
    cache = live_cache(config, tokens, batch_size=2, dtype=dtype)
    parts = config.cache_breakdown(tokens, batch_size=2, bytes_per_value=size)
    assert set(parts) == {"global_kv", "local_kv", "mamba_conv", "mamba_ssm"}
    assert cache.memory_bytes() == {
        "kv": parts["global_kv"] + parts["local_kv"],
        "mamba": parts["mamba_conv"] + parts["mamba_ssm"],
    }
    assert cache_bytes(cache) == sum(parts.values())
    assert config.cache_bytes(tokens, batch_size=2, bytes_per_value=size) == sum(parts.values())
    conv = sum(c.mamba.conv.numel() * c.mamba.conv.element_size() for c in cache.layers if c.mamba)
    assert conv == parts["mamba_conv"]  # the conv buffer is in the model's dtype, the scan fp32


def test_breakdown_parts_by_hand():
    config = config_of("hybrid, local heads")  # 2 hybrid layers, 1 global KV head
    d, w, di = config.head_dim, config.sliding_window, config.mamba_d_inner
    parts = config.cache_breakdown(10, bytes_per_value=2)
    assert parts == {
        "global_kv": 2 * 2 * 1 * d * 10 * 2,  # layers × K,V × heads × head_dim × tokens × bytes
        "local_kv": 2 * 2 * 1 * d * w * 2,  # the whole ring
        "mamba_conv": 2 * di * config.mamba_d_conv * 2,
        "mamba_ssm": 2 * di * config.mamba_d_state * 4,  # fp32 in any dtype
    }
    empty = config.cache_breakdown(0)
    assert empty["global_kv"] == empty["local_kv"] == 0 < empty["mamba_ssm"]
    with pytest.raises(ValueError):
        config.cache_breakdown(-1)


def brute_force_crossover(config, other, bytes_per_value=4, limit=5_000):
    return next(
        (
            n
            for n in range(1, limit)
            if other.cache_bytes(n, bytes_per_value=bytes_per_value)
            > config.cache_bytes(n, bytes_per_value=bytes_per_value)
        ),
        None,
    )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [4, 2])
def test_crossover_against_the_transformer_twin_equals_brute_force(name, size):
    config = config_of(name)
    twin = full_attention_config(config)
    found = config.cache_crossover(twin, bytes_per_value=size)
    assert found == brute_force_crossover(config, twin, size)
    if found is not None and found > 1:
        assert twin.cache_bytes(found, bytes_per_value=size) > config.cache_bytes(
            found, bytes_per_value=size
        ) and twin.cache_bytes(found - 1, bytes_per_value=size) <= config.cache_bytes(
            found - 1, bytes_per_value=size
        )


@pytest.mark.parametrize("preset", ["tiny", "tiny-parallel", "small"])
@pytest.mark.parametrize("size", [4, 2])
def test_crossover_of_presets_equals_brute_force(preset, size):
    config = MiniFusionConfig.from_preset(preset)
    twin = full_attention_config(config)
    assert config.cache_crossover(twin, bytes_per_value=size) == brute_force_crossover(
        config, twin, size
    )


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("size", [4, 2])
def test_one_mamba_layer_against_one_attention_layer(preset, size):
    def one_layer(mixer, **overrides):
        return MiniFusionConfig.from_preset(
            preset, num_hidden_layers=1, mixer_types=[mixer], ffn_types=["none"],
            global_attention_layers=None, **overrides,
        )  # fmt: skip

    mamba = one_layer("mamba")
    attention = one_layer("attention", sliding_window=None, num_global_heads=None)
    found = mamba.cache_crossover(attention, bytes_per_value=size)
    assert found == brute_force_crossover(mamba, attention, size)
    # the closed form of chapters 00, 09 and 16: state bytes // KV bytes per token + 1
    state = mamba.mamba_d_inner * (mamba.mamba_d_conv * size + mamba.mamba_d_state * 4)
    per_token = 2 * attention.num_key_value_heads * attention.head_dim * size
    assert found == state // per_token + 1
    # the other way round: the state is larger from the first token (the KV cache is smaller
    # only until the crossover)
    assert attention.cache_crossover(mamba, bytes_per_value=size) == 1


def test_crossover_is_one_or_none_in_the_edge_cases():
    hybrid = config_of("hybrid, local heads")
    assert hybrid.cache_crossover(hybrid) is None  # equal caches: never larger
    mamba = config_of("mamba-only")
    tiny_state = mamba.replaced(mamba_d_state=1, mamba_d_conv=2, mamba_expand=1)
    huge_kv = full_attention_config(mamba)
    assert tiny_state.cache_crossover(huge_kv) == brute_force_crossover(tiny_state, huge_kv)
