"""Generation with the hybrid cache: incremental logits equal the full forward pass, and
generate() gives the same tokens with and without the cache (greedy and sampling, a batch with
left padding, prompts longer than the sliding window)."""

import pytest
import torch

from minifusion.cache import HybridCache
from minifusion.compat import CACHE_NAME, cache_keyword
from minifusion.model import MiniFusionForCausalLM

from .test_model import small_config


def lively_model(pattern: str = "everything", **overrides) -> MiniFusionForCausalLM:
    """Larger random weights than the default init, so greedy decoding does not just repeat."""
    torch.manual_seed(0)
    return MiniFusionForCausalLM(small_config(pattern, initializer_range=0.3, **overrides)).eval()


def left_padded_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # row 0: 7 real tokens, row 1: 11 (window is 6)
    return ids, mask


@pytest.mark.parametrize("pattern", ["everything", "hybrid-dense", "llama", "mamba", "jamba"])
def test_incremental_logits_equal_the_full_forward(pattern):
    model = lively_model(pattern)
    ids, mask = left_padded_batch()
    continuation = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    full_ids = torch.cat([ids, continuation], 1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], 1)
    with torch.no_grad():
        expected = model(full_ids, attention_mask=full_mask).logits
        cache = HybridCache(model.model, batch_size=2)
        logits = [model(ids, attention_mask=mask, past_key_values=cache).logits]
        for t in range(continuation.shape[1]):
            step_mask = full_mask[:, : ids.shape[1] + t + 1]
            out = model(continuation[:, t : t + 1], attention_mask=step_mask, past_key_values=cache)
            logits.append(out.logits)
    got = torch.cat(logits, 1)
    real = full_mask.bool()
    assert (got - expected).abs()[real].max() <= 1e-4
    assert cache.seen_tokens == full_ids.shape[1]


def test_cache_memory_is_bounded_where_it_should_be():
    model = lively_model("everything")
    cache = HybridCache(model.model, batch_size=1)
    with torch.no_grad():
        model(torch.randint(1, 61, (1, 20)), past_key_values=cache)
        first = cache.memory_bytes()
        local = cache.layers[1].kv.local_keys.shape[2]
        model(torch.randint(1, 61, (1, 1)), past_key_values=cache)
    second = cache.memory_bytes()
    assert local == 6  # the local heads keep only the window
    assert second["mamba"] == first["mamba"] > 0
    assert second["kv"] > first["kv"]  # the global heads keep every key


def _bytes_held(tensors) -> int:
    """Bytes of every distinct storage behind ``tensors`` (what the cache really keeps alive)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("prompt_length", [3, 20])  # shorter and longer than the window (6)
def test_cache_reports_every_byte_it_holds_right_after_the_prompt(prompt_length):
    model = lively_model("everything")
    cache = HybridCache(model.model, batch_size=1)
    with torch.no_grad():
        model(torch.randint(1, 61, (1, prompt_length)), past_key_values=cache)
    for layer in cache.layers:
        kv = layer.kv
        if kv is None:
            continue
        held = [t for t in (kv.global_keys, kv.global_values, kv.local_keys, kv.local_values)
                if t is not None]  # fmt: skip
        assert held and _bytes_held(held) == kv.memory_bytes()


@pytest.mark.parametrize(
    "sampling",
    [dict(do_sample=False),
     dict(do_sample=True, temperature=0.8, top_k=12, top_p=0.9)],
)  # fmt: skip
def test_generate_is_the_same_with_and_without_the_cache(sampling):
    model = lively_model()
    ids, mask = left_padded_batch()
    results = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        results.append(model.generate(ids, attention_mask=mask, max_new_tokens=10,
                                      use_cache=use_cache, pad_token_id=0, **sampling))  # fmt: skip
    assert torch.equal(results[0], results[1])
    new_tokens = results[0][:, ids.shape[1] :]
    assert new_tokens.shape == (2, 10) and len(new_tokens.unique()) > 3


def _record_input_lengths(model) -> list[int]:
    """Every forward pass's input length, recorded by a hook on the base model."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(ids.shape[1])

    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def test_generate_feeds_one_new_token_per_step_after_the_prompt():
    # The cache must travel from step to step under the name the installed transformers uses;
    # if it does not, generate() rebuilds it and feeds the whole sequence every step.
    model = lively_model()
    ids, mask = left_padded_batch()
    lengths = _record_input_lengths(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    assert out.shape[1] == ids.shape[1] + 6
    assert lengths == [ids.shape[1]] + [1] * 5  # the prompt, then one token per new token


def test_generate_continues_from_the_cache_it_returned():
    model = lively_model()
    ids, mask = left_padded_batch()
    one_shot = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=0)  # fmt: skip
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    returned = getattr(first, CACHE_NAME)  # generate()'s own output class names it by release
    assert isinstance(returned, HybridCache)
    assert returned.seen_tokens == first.sequences.shape[1] - 1  # the last token is not fed yet
    lengths = _record_input_lengths(model)
    grown_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    second = model.generate(first.sequences, attention_mask=grown_mask, **cache_keyword(returned),
                            max_new_tokens=6, do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(second, one_shot)
    assert lengths == [1] * 6  # only the tokens the cache has not seen


def test_output_cache_is_readable_under_both_names():
    model = lively_model()
    cache = HybridCache(model.model, batch_size=1)
    with torch.no_grad():
        out = model(torch.randint(1, 61, (1, 5)), past_key_values=cache)
        again = model(torch.randint(1, 61, (1, 1)), cache=out.cache)
    assert out.cache is cache and out.past_key_values is cache and again.cache is cache
    assert cache.seen_tokens == 6
    with pytest.raises(ValueError, match="Pass the cache once"):
        model(torch.randint(1, 61, (1, 1)), cache=cache,
              past_key_values=HybridCache(model.model, batch_size=1))  # fmt: skip


@pytest.mark.parametrize("pattern", ["everything", "llama", "mamba", "jamba"])
def test_a_hand_written_decoding_loop_equals_generate(pattern):
    """The loop transformers users write: ``use_cache=True`` on the prompt returns a fresh cache,
    which the next calls continue (before, it returned no cache and every step lost the prompt)."""
    model = lively_model(pattern)
    prompt = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        out = model(prompt, use_cache=True)
        cache = getattr(out, CACHE_NAME)
        assert isinstance(cache, HybridCache) and cache.seen_tokens == prompt.shape[1]
        tokens = prompt
        for _ in range(8):
            next_id = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, next_id], 1)
            out = model(next_id, use_cache=True, **cache_keyword(getattr(out, CACHE_NAME)))
    assert torch.equal(tokens, expected)
    assert getattr(out, CACHE_NAME) is cache and cache.seen_tokens == prompt.shape[1] + 8
    with torch.no_grad():  # without use_cache nothing is kept (training)
        assert getattr(model(prompt), CACHE_NAME) is None
