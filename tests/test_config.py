import json
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from minifusion.config import MiniFusionConfig, list_presets, swiglu_intermediate_size


# ---------------------------------------------------------------------------- validation ---
def test_acceptance_hidden_not_divisible_by_heads_names_both_fields():
    with pytest.raises(ValueError) as info:
        MiniFusionConfig(hidden_size=100, num_attention_heads=3)
    message = str(info.value)
    assert "hidden_size" in message and "num_attention_heads" in message


@pytest.mark.parametrize(
    ("kwargs", "fields_named"),
    [
        (
            dict(num_attention_heads=4, num_key_value_heads=3),
            ["num_attention_heads", "num_key_value_heads"],
        ),
        (
            dict(num_hidden_layers=4, mixer_types=["hybrid"] * 3),
            ["mixer_types", "num_hidden_layers"],
        ),
        (dict(num_hidden_layers=2, ffn_types=["dense"] * 3), ["ffn_types", "num_hidden_layers"]),
        (
            dict(mixer_types=["hybrid", "transformer", "mamba", "attention"]),
            ["mixer_types", "transformer"],
        ),
        (dict(ffn_types=["dense", "dense", "mlp", "none"]), ["ffn_types", "mlp"]),
        (dict(moe_num_experts=4, moe_top_k=5), ["moe_top_k", "moe_num_experts"]),
        (dict(sliding_window=0, num_global_heads=2), ["sliding_window"]),
        (dict(sliding_window=-3), ["sliding_window"]),
        (dict(sliding_window=16, num_global_heads=5), ["num_global_heads", "num_attention_heads"]),
        (dict(num_global_heads=2), ["num_global_heads", "sliding_window"]),
        (
            dict(num_key_value_heads=2, sliding_window=16, num_global_heads=1),
            ["num_global_heads", "group"],
        ),
        (dict(hidden_size=0), ["hidden_size"]),
        (dict(num_hidden_layers=0), ["num_hidden_layers"]),
        (dict(vocab_size=-5), ["vocab_size"]),
        (dict(intermediate_size=0), ["intermediate_size"]),
        (dict(mamba_d_state=0), ["mamba_d_state"]),
        (dict(mamba_dt_rank=0), ["mamba_dt_rank"]),
        (dict(mamba_dt_rank="big"), ["mamba_dt_rank"]),
        (dict(moe_num_shared_experts=-1), ["moe_num_shared_experts"]),
        (dict(fusion_gate="sum"), ["fusion_gate"]),
        (dict(mamba_scan_impl="fast"), ["mamba_scan_impl"]),
        (dict(attention_impl="flash"), ["attention_impl"]),
        (dict(moe_router_scoring="relu"), ["moe_router_scoring"]),
        (dict(hidden_act="gelu"), ["hidden_act"]),
        (dict(mamba_dt_min=0.5, mamba_dt_max=0.1), ["mamba_dt_min", "mamba_dt_max"]),
        (dict(attention_dropout=1.0), ["attention_dropout"]),
        (dict(gate_balance_target=1.0), ["gate_balance_target"]),
        (dict(moe_capacity_factor=0.0), ["moe_capacity_factor"]),
        (dict(num_attention_heads=4, num_key_value_heads=8), ["num_key_value_heads"]),
    ],
)
def test_every_validation_error_names_its_fields(kwargs, fields_named):
    with pytest.raises(ValueError) as info:
        MiniFusionConfig(**kwargs)
    for name in fields_named:
        assert name in str(info.value), (name, str(info.value))


@pytest.mark.parametrize(
    "kwargs", [dict(hidden_size="128"), dict(tie_word_embeddings="yes"), dict(mixer_types="hybrid")]
)
def test_wrong_types_are_rejected_naming_the_field(kwargs):
    with pytest.raises(StrictDataclassFieldValidationError) as info:
        MiniFusionConfig(**kwargs)
    assert next(iter(kwargs)) in str(info.value)


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as info:
        MiniFusionConfig(moe_top_k=9, fusion_gate="sum")
    assert "moe_top_k" in str(info.value) and "fusion_gate" in str(info.value)


def test_explicit_head_dim_lifts_divisibility_requirement():
    config = MiniFusionConfig(hidden_size=100, num_attention_heads=3, head_dim=32)
    assert config.head_dim == 32


def test_check_after_editing_fields():
    config = MiniFusionConfig()
    config.moe_top_k = 99
    with pytest.raises(ValueError, match="moe_top_k"):
        config.check()


# ---------------------------------------------------------------------------- defaults -----
def test_derived_defaults():
    config = MiniFusionConfig(hidden_size=256, num_hidden_layers=3, num_attention_heads=8)
    assert config.head_dim == 32
    assert config.num_key_value_heads == 8
    assert config.num_global_heads == 8 and config.num_local_heads == 0
    assert config.intermediate_size == 704  # 8/3 · 256 = 682.7 → next multiple of 64
    assert config.moe_intermediate_size == 704
    assert config.mixer_types == ["hybrid"] * 3 and config.ffn_types == ["dense"] * 3
    assert config.resolved_dt_rank == 16 and config.mamba_d_inner == 512
    assert config.rope_theta == 10000.0


@pytest.mark.parametrize(
    ("hidden", "expected"), [(128, 384), (512, 1408), (1536, 4096), (4096, 11008)]
)
def test_swiglu_rule(hidden, expected):
    # 4096 → 11008 with multiple_of=256 is Llama-7B's published size
    multiple = 256 if hidden == 4096 else 64
    assert swiglu_intermediate_size(hidden, multiple) == expected


def test_legacy_layer_types_keyword_becomes_mixer_types():
    config = MiniFusionConfig(layer_types=["attention", "mamba", "hybrid", "hybrid"])
    assert config.mixer_types == ["attention", "mamba", "hybrid", "hybrid"]
    assert not hasattr(config, "layer_types") or config.layer_types is None


def test_rope_scaling_dict_like_transformers():
    config = MiniFusionConfig(rope_theta=5e5, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["rope_theta"] == 5e5
    assert (
        config.rope_parameters["original_max_position_embeddings"] == config.max_position_embeddings
    )


# ---------------------------------------------------------------------- presets & files ----
def test_presets_exist_and_load():
    assert {"tiny", "small", "fusiontree-1.5b"} <= set(list_presets())
    for name in list_presets():
        MiniFusionConfig.from_preset(name)


def test_fusiontree_preset_is_the_reference_configuration():
    config = MiniFusionConfig.from_preset("fusiontree-1.5b")
    assert config.hidden_size == 1536 and config.num_hidden_layers == 18
    assert config.mixer_types == ["hybrid"] * 18
    assert config.sliding_window == 256 and config.num_global_heads == 2
    assert 1.4e9 < config.estimate_parameters() < 1.6e9


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="tiny"):
        MiniFusionConfig.from_preset("huge")


@pytest.mark.parametrize("name", ["tiny", "small", "fusiontree-1.5b"])
def test_yaml_round_trip(tmp_path, name):
    config = MiniFusionConfig.from_preset(name)
    config.to_yaml(tmp_path / "c.yaml", extra={"data": {"block_size": 64}})
    again = MiniFusionConfig.from_yaml(tmp_path / "c.yaml")
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", ["tiny", "small", "fusiontree-1.5b"])
def test_save_pretrained_round_trip(tmp_path, name):
    config = MiniFusionConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "minifusion" and saved["mixer_types"] == config.mixer_types
    again = MiniFusionConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_yaml_unknown_field_and_numeric_strings(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ValueError, match="hiden_size"):
        MiniFusionConfig.from_yaml(tmp_path / "bad.yaml")
    # PyYAML reads 1e-6 (no dot) as a string; from_yaml turns it back into a float.
    (tmp_path / "eps.yaml").write_text("model:\n  rms_norm_eps: 1e-6\n")
    assert MiniFusionConfig.from_yaml(tmp_path / "eps.yaml").rms_norm_eps == 1e-6


# ------------------------------------------------------- counts vs independent references ---
def _llama_twin(config: MiniFusionConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            tie_word_embeddings=config.tie_word_embeddings,
            attention_bias=config.attention_bias,
            mlp_bias=False,
        )
    )


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_dense_config_counts_like_llama(kv_heads, tied, bias):
    config = MiniFusionConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, tie_word_embeddings=tied, attention_bias=bias,
        mixer_types=["attention"] * 2, ffn_types=["dense"] * 2,
    )  # fmt: skip
    assert config.estimate_parameters() == _llama_twin(config).num_parameters()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("proj_bias", [False, True])
def test_mamba_config_counts_like_hf_mamba(tied, proj_bias):
    config = MiniFusionConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, tie_word_embeddings=tied,
        mixer_types=["mamba"] * 2, ffn_types=["none"] * 2, mamba_proj_bias=proj_bias,
    )  # fmt: skip
    reference = MambaForCausalLM(
        MambaConfig(
            vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=config.mamba_d_state,
            expand=config.mamba_expand, conv_kernel=config.mamba_d_conv,
            time_step_rank=config.resolved_dt_rank, use_bias=proj_bias, use_conv_bias=True,
            tie_word_embeddings=tied,
        )
    )  # fmt: skip
    assert config.estimate_parameters() == reference.num_parameters()


def test_active_parameters_count_only_top_k_experts():
    config = MiniFusionConfig(
        ffn_types=["moe", "dense", "moe", "none"], moe_num_experts=8, moe_top_k=2
    )
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    assert config.estimate_parameters() - config.estimate_active_parameters() == 2 * 6 * expert


def test_matmul_flops_match_flop_counter_on_llama():
    """The projection + FFN + LM-head terms equal PyTorch's own count of the matmuls.

    FlopCounterMode counts the full T×T score matrix of eager attention; we count only the
    keys each causal query sees, so the score terms are compared separately.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = MiniFusionConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mixer_types=["attention"] * 2, ffn_types=["dense"] * 2,
    )  # fmt: skip
    model = _llama_twin(config)
    model.config._attn_implementation = "eager"
    seq = 32
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, seq, dtype=torch.long))
    measured = counter.get_total_flops() / seq
    ours = config.flops_breakdown(seq)
    full_scores = (
        config.num_hidden_layers * 2 * 2 * config.num_attention_heads * config.head_dim * seq
    )
    matmuls = sum(v for k, v in ours.items() if k != "attention_scores")
    assert math.isclose(measured, matmuls + full_scores, rel_tol=1e-12)
    causal = (
        config.num_hidden_layers
        * 2
        * 2
        * config.num_attention_heads
        * config.head_dim
        * (seq + 1)
        / 2
    )
    assert math.isclose(ours["attention_scores"], causal, rel_tol=1e-12)


def test_sliding_window_caps_attention_flops():
    windowed = MiniFusionConfig(
        sliding_window=64, num_global_heads=0, mixer_types=["attention"] * 4
    )
    full = MiniFusionConfig(mixer_types=["attention"] * 4)
    short, long = 32, 8192
    assert (
        windowed.flops_breakdown(short)["attention_scores"]
        == full.flops_breakdown(short)["attention_scores"]
    )
    ratio = (
        full.flops_breakdown(long)["attention_scores"]
        / windowed.flops_breakdown(long)["attention_scores"]
    )
    assert ratio > 60  # full grows with T/2 ≈ 4096 keys, the window stays ≤ 64
    with pytest.raises(ValueError, match="seq_len"):
        full.estimate_flops_per_token(0)


def test_replaced_returns_a_checked_copy_and_leaves_the_original():
    config = MiniFusionConfig.from_preset("tiny")
    mamba = config.replaced(mixer_types=["mamba"] * 4, ffn_types=["none"] * 4,
                            global_attention_layers=None)  # tiny's layer 2 is no longer attention
    with pytest.raises(ValueError, match="global_attention_layers contains"):
        config.replaced(mixer_types=["mamba"] * 4, ffn_types=["none"] * 4)
    original = ["attention", "mamba", "attention", "mamba"]  # configs/tiny.yaml
    assert mamba.mixer_types == ["mamba"] * 4 and config.mixer_types == original
    assert mamba.hidden_size == config.hidden_size and mamba.sliding_window == 64
    with pytest.raises(ValueError, match="mixer_types has 2 entries"):
        config.replaced(mixer_types=["mamba"] * 2)
