"""bench/decode.py at tiny sizes: matched models, all three decoding, caches equal to the formula."""

import pytest

from bench.decode import (
    MODELS,
    PARAMETER_TOLERANCE,
    DecodeResults,
    build_models,
    format_cache_table,
    format_prefill_table,
    format_speed_table,
    llama_matched_to,
    main,
    parameter_count,
    parameter_mismatch,
    preset_cache_table,
    run,
)
from minifusion.config import MiniFusionConfig
from minifusion.inference import full_attention_config


def test_llama_matches_the_hybrids_active_parameters_and_the_twin_its_shape():
    models = build_models("tiny", max_positions=64)
    counts = {name: parameter_count(model) for name, model in models.items()}
    tiny = MiniFusionConfig.from_preset("tiny")
    assert counts["hybrid"] == tiny.estimate_parameters()
    assert counts["full_attention"] == full_attention_config(tiny).estimate_parameters()
    assert abs(counts["llama"] / counts["hybrid"] - 1) <= PARAMETER_TOLERANCE
    assert parameter_mismatch({**counts, "hybrid_active": counts["hybrid"]}) <= PARAMETER_TOLERANCE
    llama = models["llama"].config
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads,
            llama.num_key_value_heads, llama.vocab_size) == (
        tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads,
        tiny.num_key_value_heads, tiny.vocab_size)  # fmt: skip
    assert llama.intermediate_size < tiny.intermediate_size  # Mamba layers have no FFN to match
    assert llama.tie_word_embeddings
    # with MoE the target is the active count: a Llama of the small preset's shape and width
    small = MiniFusionConfig.from_preset("small", vocab_size=512)
    from transformers import LlamaForCausalLM

    matched = parameter_count(LlamaForCausalLM(llama_matched_to(small)))
    assert abs(matched / small.estimate_active_parameters() - 1) <= PARAMETER_TOLERANCE
    assert small.estimate_active_parameters() < small.estimate_parameters()


@pytest.mark.slow
def test_tiny_run_measures_every_model_and_caches_match_the_formula():
    # 80 tokens > the tiny preset's 64-token window: the local heads' cache is capped
    results = run("tiny", contexts=(8,), batch_sizes=(1, 2), cache_lengths=(8, 80),
                  prefill_context=16, new_tokens=2, repeats=1)  # fmt: skip
    assert [(s.batch_size, s.model) for s in results.speeds] == [
        (b, m) for b in (1, 2) for m in MODELS
    ]
    assert all(s.tokens_per_s > 0 and s.new_tokens == 2 for s in results.speeds)
    assert [(p.model, p.context) for p in results.prefills] == [(m, 16) for m in MODELS]
    assert all(p.seconds > 0 for p in results.prefills)
    assert set(results.ops_per_token) == set(MODELS)
    assert {(c.model, c.tokens) for c in results.caches} == {
        (m, n) for m in MODELS for n in (8, 80)
    }
    assert all(c.bytes == c.formula_bytes for c in results.caches)
    assert DecodeResults.from_dict(results.to_dict()) == results
    speed_rows = format_speed_table(results).splitlines()
    assert speed_rows[-1].startswith("| 2 | 8 | transformers Llama |")
    assert speed_rows[-1].endswith("| 1.00 |")
    assert format_prefill_table(results).splitlines()[-1].startswith("| 16 | transformers Llama")
    assert format_cache_table(results).splitlines()[-1].startswith("| 80 |")


def test_command_line(capsys):
    main(["--contexts", "4", "--batch-sizes", "1", "--prefill-context", "8", "--new-tokens", "1",
          "--cache-lengths", "8", "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "ratio to Llama" in out and "hybrid / Llama" in out and "transformers Llama" in out


def test_preset_cache_table_is_the_config_formula():
    table = preset_cache_table(presets=("tiny", "tiny-parallel"), tokens=(1000, 16384)).splitlines()
    assert len(table) == 4
    tiny = MiniFusionConfig.from_preset("tiny")
    per_token = tiny.cache_bytes(1001) - tiny.cache_bytes(1000)
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:2] == ["tiny", "1 of 2"]
    assert int(cells[3].replace(",", "")) == per_token
    assert int(cells[2].replace(",", "")) + 1000 * per_token == tiny.cache_bytes(1000)
    assert float(cells[5]) <= 0.15  # the target for the default preset at 16,384 tokens
    assert table[3].startswith("| tiny-parallel | 4 of 4 |")
