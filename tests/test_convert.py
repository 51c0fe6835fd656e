"""Converters: transformers' Llama (GQA, YaRN), Mixtral (top-2) and Mamba causal LMs give the
same logits (≤ 1e-4, fp32) and the same greedy generations as their MiniFusion conversions; a
converted Mixtral's MoE auxiliary loss relates to transformers' as ``from_mixtral`` documents."""

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
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from minifusion.convert import from_llama, from_mamba, from_mixtral

COMMON = dict(vocab_size=83, hidden_size=32, num_hidden_layers=2, initializer_range=0.2)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                 max_position_embeddings=64)  # fmt: skip


def llama(**overrides):
    return LlamaForCausalLM(LlamaConfig(**COMMON, **ATTENTION, **overrides))


def mixtral(**overrides):
    config = MixtralConfig(**{**COMMON, **overrides}, **ATTENTION, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=None,
                           router_jitter_noise=0.0)  # fmt: skip
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


def _aux_losses(layers_alike: bool):
    """Run a 4-layer Mixtral (with ``output_router_logits=True``) and its conversion on the same
    batch, with labels; return the Mixtral, both outputs and our layers' balance losses."""
    torch.manual_seed(0)
    reference = mixtral(num_hidden_layers=4, router_aux_loss_coef=0.02).eval()
    layers = reference.model.layers
    if layers_alike:
        # every router sees the embeddings — no attention output (o_proj = 0), no MoE output
        # before the last layer (down_proj = 0) — through layer 0's norm and router weights
        first = layers[0]
        with torch.no_grad():
            for layer in layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.post_attention_layernorm.weight.copy_(first.post_attention_layernorm.weight)
                layer.mlp.gate.weight.copy_(first.mlp.gate.weight)
            for layer in layers[:-1]:
                layer.mlp.experts.down_proj.zero_()
    ours = from_mixtral(reference)
    balance = []
    for layer in ours.model.layers:
        layer.moe.register_forward_hook(lambda m, args, out: balance.append(out.balance_loss))
    ids = torch.randint(0, 83, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(ids, labels=ids, output_router_logits=True)
        mine = ours(ids, labels=ids)
    return reference, theirs, mine, balance


@pytest.mark.parametrize("layers_alike", [False, True], ids=["general", "layers-alike"])
def test_converted_mixtral_aux_loss_relates_to_transformers_as_documented(layers_alike):
    reference, theirs, mine, balance = _aux_losses(layers_alike)
    config = reference.config
    experts, top_k, coef = config.num_local_experts, config.num_experts_per_tok, 0.02
    logits = theirs.router_logits  # one (B·T, E) tensor per layer
    assert len(logits) == len(balance) == 4

    # each of our layers' losses is transformers' loss of that layer's router logits alone
    per_layer = torch.stack([load_balancing_loss_func((x,), experts, top_k) for x in logits])
    assert torch.allclose(torch.stack(balance), per_layer, atol=1e-6)
    assert torch.allclose(mine.moe_aux_loss, coef * per_layer.mean(), atol=1e-7)

    # theirs pools the layers: ours − theirs = c · E · Σᵢ cov_l(f_li, P_li) exactly
    probs = torch.stack([x.float().softmax(-1) for x in logits])  # (L, N, E)
    chosen = probs.topk(top_k, dim=-1).indices
    f = torch.zeros_like(probs).scatter_(-1, chosen, 1.0).mean(1)  # (L, E), rows sum to k
    p = probs.mean(1)
    covariance = coef * experts * ((f * p).mean(0) - f.mean(0) * p.mean(0)).sum()
    their_term = coef * theirs.aux_loss
    assert torch.allclose(mine.moe_aux_loss, their_term + covariance, atol=1e-7)
    # the training losses differ by the same term (lm losses agree; both add their aux term)
    assert torch.allclose(mine.loss, theirs.loss + covariance, atol=1e-5)
    ratio = (mine.moe_aux_loss / their_term).item()
    if layers_alike:
        assert all(torch.equal(x, logits[0]) for x in logits)
        assert covariance.abs() <= 1e-7
        assert torch.allclose(mine.moe_aux_loss, their_term, atol=1e-7)
        assert torch.allclose(mine.loss, theirs.loss, atol=1e-5)
    else:
        assert covariance.abs() > 1e-5  # the layers do route differently here
    assert 0.9 < ratio < 1.1  # summing the per-layer losses unscaled would give about 4
