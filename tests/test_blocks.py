"""Block variants (chapter 11) and SRTE (chapter 10): LayerScale, DropPath, DeepNorm, parallel
residual, the shared time encoding — each against its defining formula, in eval and train mode,
in the parameter/FLOP accounting, through cached decoding and a save/load round trip."""

import math

import pytest
import torch

from minifusion.blocks import DropPath, deepnorm_coefficients, drop_path_rates
from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionDecoderLayer, MiniFusionForCausalLM, parameter_breakdown_of
from minifusion.rope import RotaryEmbedding
from minifusion.time_encoding import sinusoidal_table

VARIANTS = {
    "layer_scale": dict(layer_scale_init=0.1),
    "drop_path": dict(drop_path_rate=0.2),
    "deepnorm": dict(deepnorm=True),
    "parallel_residual": dict(parallel_residual=True),
    "srte_sinusoidal": dict(srte="sinusoidal"),
    "srte_learned": dict(srte="learned"),
    "xpos": dict(xpos_scale_base=16),
    "all_compatible": dict(layer_scale_init=1e-2, drop_path_rate=0.1, parallel_residual=True,
                           srte="learned", xpos_scale_base=32),
}  # fmt: skip


def config_with(**overrides) -> MiniFusionConfig:
    settings = dict(
        vocab_size=61, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=4, sliding_window=6, num_global_heads=2, moe_num_experts=4,
        moe_top_k=2, fusion_gate_rank=8, mamba_d_state=8, mamba_chunk_size=8,
        max_position_embeddings=64,
        mixer_types=["hybrid", "attention", "mamba", "hybrid"],
        ffn_types=["dense", "moe", "none", "dense"],
    )  # fmt: skip
    settings.update(overrides)
    return MiniFusionConfig(**settings)


def one_layer(mixer: str = "attention", ffn: str = "dense", **overrides):
    config = config_with(num_hidden_layers=1, mixer_types=[mixer], ffn_types=[ffn], **overrides)
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(config)  # the model's init, as in training
    layer = model.model.layers[0]
    x = torch.randn(2, 9, config.hidden_size)
    tables = RotaryEmbedding(config)(torch.arange(9)[None])
    return layer, x, tables


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_matches_the_config(variant):
    config = config_with(**VARIANTS[variant])
    model = MiniFusionForCausalLM(config)
    assert parameter_breakdown_of(model) == config.parameter_breakdown()
    assert model.num_parameters() == config.estimate_parameters()


def test_parameter_and_flop_costs_of_each_variant():
    base = config_with()
    h, layers_with_ffn = base.hidden_size, 3  # ffn_types has one "none"
    branches = base.num_hidden_layers + layers_with_ffn  # residual additions in the model
    params = lambda **kw: config_with(**kw).estimate_parameters()  # noqa: E731
    flops = lambda **kw: config_with(**kw).estimate_flops_per_token(32)  # noqa: E731
    assert params(layer_scale_init=0.1) - params() == h * branches
    assert params(parallel_residual=True) - params() == -h * layers_with_ffn  # one norm fewer
    assert params(srte="learned") - params() == base.max_position_embeddings * h
    for free in (dict(deepnorm=True), dict(drop_path_rate=0.3), dict(srte="sinusoidal"),
                 dict(xpos_scale_base=64)):  # fmt: skip
        assert params(**free) == params()
    assert flops(layer_scale_init=0.1) - flops() == h * branches
    assert flops(deepnorm=True) - flops() == h * branches
    assert flops(srte="sinusoidal") - flops() == h * 3  # three layers have a Mamba branch
    assert flops(xpos_scale_base=64) == flops() == flops(parallel_residual=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_matches_the_full_forward(variant):
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(config_with(**VARIANTS[variant])).eval()
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        steps = [out.logits]
        for t in range(12, 20):
            out = model(ids[:, t : t + 1], cache=out.cache)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["layer_scale", "srte_learned", "deepnorm", "xpos"])
def test_save_and_load_keep_the_logits(variant, tmp_path):
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(config_with(**VARIANTS[variant])).eval()
    with torch.no_grad():  # move the learned tables away from their init
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    loaded = MiniFusionForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 61, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------ LayerScale ---
def test_layer_scale_starts_each_sublayer_near_the_identity_and_learns():
    layer, x, tables = one_layer(layer_scale_init=1e-6)
    assert torch.equal(layer.mixer_residual.layer_scale.gamma, torch.full((32,), 1e-6))
    out, _ = layer(x, tables)
    assert (out - x).abs().max() < 1e-4  # γ = 1e-6 scales both sublayers' outputs away
    plain_layer, _, _ = one_layer()
    plain_out, _ = plain_layer(x, tables)
    assert (plain_out - x).abs().max() > 1e-2  # without LayerScale they are not negligible
    out.square().sum().backward()
    assert layer.ffn_residual.layer_scale.gamma.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- DropPath ---
def test_drop_path_drops_whole_samples_keeps_the_mean_and_is_off_in_eval():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    y = drop(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert per_sample[:, 0].unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    dropped = (per_sample[:, 0] == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.03  # binomial std at n=4000 is 0.007
    assert abs(y.mean().item() - 1.0) < 0.05  # survivors scaled by 1/(1-p)


def test_drop_path_rates_grow_linearly_with_depth():
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.3, 1) == [0.3]
    with pytest.raises(ValueError, match="must be in"):
        DropPath(1.0)


def test_a_model_with_drop_path_equals_one_without_in_eval_but_not_in_training():
    torch.manual_seed(0)
    plain = MiniFusionForCausalLM(config_with())
    dropping = MiniFusionForCausalLM(config_with(drop_path_rate=0.5))
    dropping.load_state_dict(plain.state_dict())  # DropPath adds no parameters
    ids = torch.randint(0, 61, (8, 12))
    plain.eval(), dropping.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropping(ids).logits, plain(ids).logits)
        dropping.train(), plain.train()
        assert not torch.allclose(dropping(ids).logits, plain(ids).logits)


# -------------------------------------------------------------------------------- DeepNorm ---
def test_deepnorm_coefficients_are_deepnets_decoder_only_values():
    # Wang et al. (2022), decoder-only: α = (2N)^(1/4), β = (8N)^(−1/4)
    assert deepnorm_coefficients(6) == pytest.approx((12**0.25, 48**-0.25))
    alpha, beta = deepnorm_coefficients(1000)
    assert alpha == pytest.approx(6.6874, abs=1e-4) and beta == pytest.approx(0.10574, abs=1e-5)


def test_deepnorm_layer_is_post_norm_with_an_up_weighted_residual():
    layer, x, tables = one_layer(deepnorm=True)
    alpha = deepnorm_coefficients(1)[0]
    mixed = layer.attn(x, tables)  # no norm before the sublayer
    h = layer.input_layernorm(alpha * x + mixed)
    expected = layer.post_attention_layernorm(alpha * h + layer.mlp(h))
    out, _ = layer(x, tables)
    torch.testing.assert_close(out, expected)


def test_deepnorm_initialises_value_output_and_ffn_weights_with_gain_beta():
    torch.manual_seed(0)
    config = config_with(hidden_size=256, num_attention_heads=4, intermediate_size=512,
                         fusion_gate_rank=32, deepnorm=True)  # fmt: skip
    layer = MiniFusionForCausalLM(config).model.layers[0]  # a hybrid layer with a dense FFN
    beta = deepnorm_coefficients(config.num_hidden_layers)[1]

    def xavier(linear, gain):
        return gain * math.sqrt(2 / (linear.in_features + linear.out_features))

    for linear, gain in [(layer.attn.q_proj, 1.0), (layer.attn.k_proj, 1.0),
                         (layer.attn.v_proj, beta), (layer.attn.o_proj, beta),
                         (layer.mlp.up_proj, beta), (layer.mlp.down_proj, beta),
                         (layer.mamba.in_proj, beta), (layer.mamba.out_proj, beta),
                         (layer.fusion.fusion_proj, beta)]:  # fmt: skip
        expected = xavier(linear, gain)
        assert abs(linear.weight.std().item() - expected) < 0.05 * expected, linear


# ------------------------------------------------------------------------ parallel residual ---
def test_parallel_residual_adds_both_sublayers_to_the_same_input():
    layer, x, tables = one_layer(parallel_residual=True)
    assert not hasattr(layer, "post_attention_layernorm")
    normed = layer.input_layernorm(x)
    expected = x + layer.attn(normed, tables) + layer.mlp(normed)
    out, _ = layer(x, tables)
    torch.testing.assert_close(out, expected)


# -------------------------------------------------------------------------------- SRTE ---
def test_sinusoidal_table_follows_the_transformer_formula():
    table = sinusoidal_table(50, 16)
    for p, i in [(0, 0), (7, 0), (7, 3), (49, 7)]:
        angle = p / 10000 ** (2 * i / 16)
        assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_srte_adds_one_shared_table_to_every_mamba_branch_input(kind):
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(config_with(srte=kind))
    ids = torch.randint(0, 61, (2, 10))
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(("norm", i), out))
        if layer.mamba is not None:
            layer.mamba.register_forward_pre_hook(
                lambda m, args, i=i: seen.__setitem__(("mamba", i), args[0]))  # fmt: skip
    model(ids, labels=ids).loss.backward()
    table = model.model.srte.table[:10]
    mamba_layers = [i for i, m in enumerate(model.config.mixer_types) if m != "attention"]
    assert mamba_layers == [0, 2, 3]
    for i in mamba_layers:
        torch.testing.assert_close(seen[("mamba", i)], seen[("norm", i)] + table)
    if kind == "learned":
        assert model.model.srte.table.grad[:10].abs().sum() > 0
        assert model.model.srte.table.grad[10:].abs().sum() == 0  # positions never seen


def test_srte_beyond_the_table_grows_when_sinusoidal_and_names_the_fix_when_learned():
    sinusoidal = MiniFusionForCausalLM(config_with(srte="sinusoidal")).eval()
    with torch.no_grad():
        sinusoidal(torch.zeros(1, 80, dtype=torch.long))  # max_position_embeddings is 64
    assert sinusoidal.model.srte.table.shape[0] >= 80
    learned = MiniFusionForCausalLM(config_with(srte="learned")).eval()
    with pytest.raises(ValueError, match="srte='sinusoidal'"):
        learned(torch.zeros(1, 80, dtype=torch.long))


# -------------------------------------------------------------------------- validation ---
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(deepnorm=True, parallel_residual=True), "turn one of them off"),
        (dict(drop_path_rate=1.0), "drop_path_rate=1.0 must be in"),
        (dict(layer_scale_init=0.0), "layer_scale_init=0.0 must be positive"),
        (dict(srte="rotary"), "srte='rotary' is not one of"),
        (dict(srte="learned", mixer_types=["attention"] * 4, ffn_types=["dense"] * 4),
         "no layer has one"),
        (dict(xpos_scale_base=512, mixer_types=["mamba"] * 4, ffn_types=["none"] * 4),
         "no layer has attention"),
        (dict(xpos_scale_base=0), "xpos_scale_base=0"),
        (dict(xpos_scale_base=2), "xpos_scale_base ≥ max_position_embeddings / 16"),
    ],
)  # fmt: skip
def test_bad_block_settings_are_named_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_with(**overrides)


def test_layer_forward_accepts_the_decoder_layer_signature():
    layer = MiniFusionDecoderLayer(config_with(num_hidden_layers=1, mixer_types=["mamba"],
                                               ffn_types=["none"], srte="sinusoidal"), 0)  # fmt: skip
    x = torch.randn(1, 5, 32)
    out, losses = layer(x, None, None, None, torch.zeros(1, 5, 32))
    assert out.shape == x.shape and losses == {}
