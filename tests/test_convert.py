"""Converters: transformers' Llama (GQA, YaRN), Mixtral (top-2) and Mamba causal LMs give the
same logits (≤ 1e-4, fp32) and the same greedy generations as their MiniFusion conversions."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from minifusion.convert import from_llama, from_mamba, from_mixtral

COMMON = dict(vocab_size=83, hidden_size=32, num_hidden_layers=2, initializer_range=0.2)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                 max_position_embeddings=64)  # fmt: skip


def llama(**overrides):
    return LlamaForCausalLM(LlamaConfig(**COMMON, **ATTENTION, **overrides))


def mixtral():
    config = MixtralConfig(**COMMON, **ATTENTION, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=None, router_jitter_noise=0.0)  # fmt: skip
    return MixtralForCausalLM(config)


def mamba():
    model = MambaForCausalLM(MambaConfig(**COMMON, state_size=8, expand=2, conv_kernel=4))
    with torch.no_grad():  # a fresh Mamba repeats one token; livelier weights vary the text
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


CASES = {
    "llama-gqa": (lambda: llama(), from_llama),
    "llama-untied-bias": (lambda: llama(tie_word_embeddings=False, attention_bias=True),
                          from_llama),
    "llama-yarn": (lambda: llama(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                  "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 16}),
                   from_llama),
    "mixtral-top2": (mixtral, from_mixtral),
    "mamba": (mamba, from_mamba),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_logits_and_greedy_generation(case):
    build, convert = CASES[case]
    torch.manual_seed(0)
    reference = build().eval()
    ours = convert(reference)
    ids = torch.randint(0, 83, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(ids).logits
        mine = ours(ids).logits
    assert theirs.abs().max() > 0.5  # not a comparison of near-zero logits
    assert (mine - theirs).abs().max() <= 1e-4
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.config, name) == getattr(reference.config, name), name
    prompt = ids[:, :7].clone()
    prompt[0, 2] = 0  # an ordinary token here: neither model may treat it as padding
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)
    assert len(got[:, 7:].unique()) > 2  # a varied continuation, not one repeated token
