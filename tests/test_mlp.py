"""SwiGLU: parity with transformers' LlamaMLP and the config's parameter count."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from minifusion.config import MiniFusionConfig
from minifusion.mlp import SwiGLU


@pytest.mark.parametrize("hidden, intermediate", [(64, None), (96, 200), (72, 192)])
def test_matches_llama_mlp(hidden, intermediate):
    torch.manual_seed(0)
    config = MiniFusionConfig(
        hidden_size=hidden, num_attention_heads=4, intermediate_size=intermediate
    )
    ours = SwiGLU(config)
    reference = LlamaMLP(
        LlamaConfig(
            hidden_size=hidden,
            num_attention_heads=4,
            intermediate_size=config.intermediate_size,
            hidden_act="silu",
            mlp_bias=False,
        )
    )
    reference.load_state_dict(ours.state_dict())  # same names: gate_proj, up_proj, down_proj
    x = torch.randn(2, 9, hidden)
    assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_parameter_count_matches_config_ffn_term():
    config = MiniFusionConfig.from_preset("tiny")
    mlp = SwiGLU(config)
    breakdown = config.layer_parameter_breakdown(0)
    ffn_weights = 3 * config.hidden_size * config.intermediate_size
    assert sum(p.numel() for p in mlp.parameters()) == ffn_weights
    ffn_entries = {k: v for k, v in breakdown.items() if k.startswith("ffn")}
    assert ffn_entries, breakdown
    assert sum(ffn_entries.values()) == ffn_weights + config.hidden_size  # + its pre-norm


def test_expert_width_override():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=4)
    expert = SwiGLU(config, intermediate_size=32)
    assert expert.gate_proj.weight.shape == (32, 64)
    assert expert(torch.randn(3, 64)).shape == (3, 64)


@pytest.mark.parametrize("width", [0, -5])
def test_bad_width_names_the_field(width):
    with pytest.raises(ValueError, match="intermediate_size"):
        SwiGLU(MiniFusionConfig(hidden_size=64, num_attention_heads=4), intermediate_size=width)
