"""Global attention in only some layers (``global_attention_layers``): the config's checks, which
heads each layer gets, the cache formula against the bytes a cache really holds, generation with
and without the cache, and the gate statistics a decoding step leaves alone."""

import pytest
import torch

from minifusion.cache import HybridCache
from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM

from .test_cache import left_padded_batch, lively_model
from .test_model import small_config

JAMBA_GLOBAL_LAST = dict(global_attention_layers=[3])  # layers 0 and 3 are attention in "jamba"


def test_only_the_listed_layers_have_global_heads():
    config = small_config("jamba", **JAMBA_GLOBAL_LAST)
    model = MiniFusionForCausalLM(config)
    attention = {i: layer.attn for i, layer in enumerate(model.model.layers) if layer.attn}
    assert attention[3].num_global_heads == 2 and attention[3].num_local_heads == 2
    assert attention[0].num_global_heads == 0 and attention[0].num_local_heads == 4
    assert attention[0].window == config.sliding_window


def test_default_puts_global_heads_in_every_attention_layer():
    config = small_config("jamba")
    assert config.global_attention_layers is None
    assert [config.global_heads_of(i) for i in range(4)] == [2, 2, 2, 2]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(global_attention_layers=[1]), "not attention or hybrid layers"),
        (dict(global_attention_layers=[3], sliding_window=None, num_global_heads=4),
         "sliding_window is None"),
        (dict(global_attention_layers=[3], num_global_heads=0), "num_global_heads=0"),
    ],
)  # fmt: skip
def test_a_bad_placement_names_the_problem_and_the_fix(overrides, words):
    with pytest.raises(ValueError, match=words):
        small_config("jamba", **overrides)


@pytest.mark.parametrize("tokens", [1, 5, 40])  # shorter and longer than the window (6)
@pytest.mark.parametrize("placement", [None, [3], []])
def test_cache_formula_equals_the_bytes_held_after_a_prompt(tokens, placement):
    model = lively_model("jamba", global_attention_layers=placement)
    for batch in (1, 3):
        cache = HybridCache(model.model, batch_size=batch)
        with torch.no_grad():
            model(torch.randint(1, 61, (batch, tokens)), past_key_values=cache)
        held = sum(cache.memory_bytes().values())
        assert held == model.config.cache_bytes(tokens, batch_size=batch)
        buffers = [t for layer in cache.layers if layer.kv for t in layer.kv.buffers()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in buffers}
        assert sum(storages.values()) == cache.memory_bytes()["kv"]  # nothing held unreported
    # in bf16 the keys, values and conv buffers halve; the scan state stays fp32
    model = model.to(torch.bfloat16)
    cache = HybridCache(model.model, batch_size=2)
    with torch.no_grad():
        model(torch.randint(1, 61, (2, tokens)), past_key_values=cache)
    held = sum(cache.memory_bytes().values())
    assert held == model.config.cache_bytes(tokens, batch_size=2, bytes_per_value=2)


def test_fewer_global_layers_give_a_cache_that_grows_more_slowly():
    everywhere = small_config("jamba")
    last_only = small_config("jamba", **JAMBA_GLOBAL_LAST)
    growth = [c.cache_bytes(2000) - c.cache_bytes(1000) for c in (everywhere, last_only)]
    assert growth[1] * 2 == growth[0]  # one global layer of two


@pytest.mark.parametrize("pattern", ["jamba", "everything"])
def test_cached_generation_equals_uncached_with_global_heads_in_one_layer(pattern):
    attention_layers = {"jamba": [0, 3], "everything": [0, 1, 3]}[pattern]
    model = lively_model(pattern, global_attention_layers=attention_layers[-1:])
    ids, mask = left_padded_batch()
    runs = []
    for use_cache in (True, False):
        runs.append(
            model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                           use_cache=use_cache, pad_token_id=0)  # fmt: skip
        )
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_flops_count_local_heads_where_the_layer_has_no_global_heads():
    everywhere = small_config("jamba")
    last_only = small_config("jamba", **JAMBA_GLOBAL_LAST)
    long = 4096
    assert (last_only.flops_breakdown(long)["attention_scores"]
            < everywhere.flops_breakdown(long)["attention_scores"])  # fmt: skip
    short = 4  # shorter than the window: a local head sees what a global one sees
    assert (last_only.flops_breakdown(short)["attention_scores"]
            == everywhere.flops_breakdown(short)["attention_scores"])  # fmt: skip


def test_gate_statistics_are_left_alone_while_decoding_unless_asked():
    model = lively_model("hybrid-dense")
    fusion = model.model.layers[0].fusion
    ids = torch.randint(1, 61, (1, 7))
    with torch.no_grad():
        model(ids)  # an evaluation pass without a cache records them
        recorded = fusion.gate_channel_mean.clone()
        assert not torch.equal(recorded, torch.full_like(recorded, 0.5))
        cache = HybridCache(model.model, batch_size=1)
        model(torch.randint(1, 61, (1, 5)), past_key_values=cache)  # prompt and steps: not
        model(torch.randint(1, 61, (1, 1)), past_key_values=cache)
        assert torch.equal(fusion.gate_channel_mean, recorded)
        fusion.record_while_decoding = True
        model(torch.randint(1, 61, (1, 1)), past_key_values=cache)
        assert not torch.equal(fusion.gate_channel_mean, recorded)


def test_yaml_round_trip_keeps_the_placement(tmp_path):
    config = small_config("jamba", **JAMBA_GLOBAL_LAST)
    config.to_yaml(tmp_path / "c.yaml")
    assert MiniFusionConfig.from_yaml(tmp_path / "c.yaml").global_attention_layers == [3]
