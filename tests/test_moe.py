"""Mixture-of-Experts: parity with transformers' Mixtral block and load-balancing loss, gradients
for unused experts, capacity, shared experts, and aux-loss-free balancing."""

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)

from minifusion.config import MiniFusionConfig
from minifusion.moe import MoE, load_balancing_loss, moe_from_mixtral_state


def make_config(**overrides) -> MiniFusionConfig:
    settings = dict(
        hidden_size=32,
        num_attention_heads=4,
        moe_num_experts=6,
        moe_top_k=2,
        moe_intermediate_size=48,
    )
    settings.update(overrides)
    return MiniFusionConfig(**settings)


def mixtral_twin(config: MiniFusionConfig) -> MixtralSparseMoeBlock:
    reference = MixtralSparseMoeBlock(
        MixtralConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.moe_intermediate_size,
            num_local_experts=config.moe_num_experts,
            num_experts_per_tok=config.moe_top_k,
            router_jitter_noise=0.0,
        )
    )
    torch.nn.init.normal_(reference.gate.weight, std=0.3)
    torch.nn.init.normal_(reference.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(reference.experts.down_proj, std=0.1)
    return reference


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_matches_mixtral_block_and_its_balancing_loss(top_k):
    torch.manual_seed(0)
    config = make_config(moe_top_k=top_k)
    reference = mixtral_twin(config)
    moe = MoE(config)
    missing = moe.load_state_dict(moe_from_mixtral_state(reference.state_dict()), strict=False)
    assert missing.missing_keys == ["router.expert_bias"] and not missing.unexpected_keys

    x = torch.randn(3, 17, config.hidden_size)
    out = moe(x)
    theirs = reference(x)
    assert (out.hidden_states - theirs).abs().max() <= 1e-5

    # transformers' loss takes a tuple of per-layer logits; one layer here
    their_loss = load_balancing_loss_func((out.router_logits,), config.moe_num_experts, top_k)
    assert (out.balance_loss - their_loss).abs() <= 1e-5
    # …and over several layers its logits are concatenated, which ours reproduces the same way
    logits_b = torch.randn_like(out.router_logits)
    both = load_balancing_loss_func((out.router_logits, logits_b), config.moe_num_experts, top_k)
    all_logits = torch.cat([out.router_logits, logits_b])
    probs = torch.softmax(all_logits, dim=-1)
    ours = load_balancing_loss(probs, probs.topk(top_k).indices, config.moe_num_experts)
    assert (ours - both).abs() <= 1e-5


def test_a_perfectly_balanced_router_scores_top_k():
    num_experts, top_k = 4, 2
    probs = torch.full((8, num_experts), 1 / num_experts)
    index = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs, index, num_experts).item() == pytest.approx(top_k)


def test_every_expert_gets_a_gradient_even_without_tokens():
    torch.manual_seed(0)
    config = make_config(moe_num_experts=6, moe_top_k=1, moe_num_shared_experts=1)
    moe = MoE(config)
    with torch.no_grad():  # force every token to expert 0
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = 1.0
    x = torch.rand(2, 5, config.hidden_size) + 0.1  # positive: expert 0 always wins
    out = moe(x)
    assert out.stats["tokens_per_expert"].tolist() == [10, 0, 0, 0, 0, 0]
    (out.hidden_states.sum() + out.aux_loss).backward()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None, name
    assert moe.experts[0].up_proj.weight.grad.abs().sum() > 0
    assert moe.experts[3].up_proj.weight.grad.abs().sum() == 0  # unrouted: exact zeros


def test_shared_experts_always_add_their_output():
    torch.manual_seed(0)
    config = make_config(moe_num_shared_experts=2)
    moe = MoE(config)
    x = torch.randn(2, 7, config.hidden_size)
    with torch.no_grad():
        total = moe(x).hidden_states
        shared = sum(expert(x) for expert in moe.shared_experts)
        moe.shared_experts = torch.nn.ModuleList()
        routed = moe(x).hidden_states
    assert torch.allclose(total, routed + shared, atol=1e-6)


def test_capacity_drops_and_counts_overflow():
    torch.manual_seed(0)
    config = make_config(moe_num_experts=4, moe_top_k=1, moe_capacity_factor=1.0)
    moe = MoE(config)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = 1.0
    x = torch.rand(1, 8, config.hidden_size) + 0.1  # all 8 tokens want expert 0; capacity 2
    out = moe(x)
    assert out.stats["dropped_fraction"].item() == pytest.approx(6 / 8)
    assert out.stats["tokens_per_expert"].tolist() == [2, 0, 0, 0]
    # the first two tokens are served, the rest get nothing from the routed experts
    assert out.hidden_states[0, 2:].abs().max() == 0
    assert out.hidden_states[0, :2].abs().max() > 0
    dropless = MoE(make_config(moe_num_experts=4, moe_top_k=1))
    dropless.load_state_dict(moe.state_dict())
    assert dropless(x).stats["dropped_fraction"].item() == 0


def test_sequence_level_balance_averages_per_sequence_losses():
    torch.manual_seed(0)
    config = make_config(moe_balance_loss="sequence")
    moe = MoE(config)
    x = torch.randn(3, 11, config.hidden_size)
    out = moe(x)
    probs = torch.softmax(out.router_logits, dim=-1).view(3, 11, -1)
    index = probs.topk(config.moe_top_k).indices
    per_sequence = [
        load_balancing_loss(probs[b], index[b], config.moe_num_experts) for b in range(3)
    ]
    assert torch.allclose(out.balance_loss, torch.stack(per_sequence).mean(), atol=1e-6)


def test_router_z_loss_and_weighted_total():
    config = make_config(moe_aux_loss_coef=0.5, moe_router_z_loss_coef=0.25)
    moe = MoE(config)
    out = moe(torch.randn(2, 4, config.hidden_size))
    expected_z = torch.logsumexp(out.router_logits, dim=-1).square().mean()
    assert torch.allclose(out.z_loss, expected_z)
    assert torch.allclose(out.aux_loss, 0.5 * out.balance_loss + 0.25 * out.z_loss)


def test_bias_changes_selection_but_not_mixing_weights():
    torch.manual_seed(0)
    config = make_config(moe_aux_loss_free_bias=True, moe_norm_topk_prob=False)
    moe = MoE(config)
    tokens = torch.randn(20, config.hidden_size)
    before = moe.router(tokens)
    moe.router.expert_bias[3] = 10.0  # expert 3 now always chosen
    after = moe.router(tokens)
    assert (after.expert_index == 3).any(dim=-1).all()
    assert not (before.expert_index == 3).any(dim=-1).all()
    chosen = after.expert_index
    assert torch.equal(after.expert_weight, after.probs.gather(-1, chosen))  # no bias inside


def skewed_inputs(config: MiniFusionConfig, seed: int) -> torch.Tensor:
    """Fresh tokens around one fixed strong direction: an untrained router favours a few experts."""
    common = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    generator = torch.Generator().manual_seed(seed)
    return common + torch.randn(4, 64, config.hidden_size, generator=generator)


@pytest.mark.parametrize("scoring, threshold", [("sigmoid", 1.3), ("softmax", 2.0)])
def test_bias_balancing_evens_a_skewed_load(scoring, threshold):
    """DeepSeek-V3 pairs the bias with sigmoid scores; with softmax scores it helps less (a few
    sharp probabilities need a large bias to overturn), so its threshold is looser."""
    torch.manual_seed(0)
    config = make_config(
        moe_num_experts=8,
        moe_router_scoring=scoring,
        moe_aux_loss_free_bias=True,
        moe_bias_update_rate=0.002,
    )
    moe = MoE(config)

    def max_over_mean_load() -> float:  # over ten held-out batches
        load = torch.zeros(config.moe_num_experts)
        with torch.no_grad():
            for seed in range(1000, 1010):
                load += moe(skewed_inputs(config, seed)).stats["tokens_per_expert"]
        return (load.max() / load.mean()).item()

    moe.eval()
    before = max_over_mean_load()
    moe.train()
    for step in range(300):
        with torch.no_grad():
            moe(skewed_inputs(config, step))
        moe.update_expert_bias()
    moe.eval()
    after = max_over_mean_load()
    assert before > 3.0, before  # the input really is skewed
    assert after < threshold, (before, after)


def test_top_k_above_experts_is_rejected_by_the_config():
    with pytest.raises(ValueError, match="moe_top_k"):
        make_config(moe_num_experts=2, moe_top_k=3)


def test_parameter_count_matches_the_config():
    config = MiniFusionConfig.from_preset("small")
    layer = config.ffn_types.index("moe")
    entries = {
        k: v for k, v in config.layer_parameter_breakdown(layer).items() if k.startswith("ffn.")
    }
    moe = MoE(config)
    norm = entries.pop("ffn.post_attention_layernorm")
    assert norm == config.hidden_size
    assert sum(p.numel() for p in moe.parameters()) == sum(entries.values())
