"""The full model: parameter count == config estimate, loss terms, gate regulariser gradients,
save/load round trip through AutoModelForCausalLM, gradient checkpointing, initialisation,
causality and left padding."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import minifusion  # noqa: F401  (registers the Auto classes)
from bench.memory import LiveTensorBytes
from minifusion.config import MiniFusionConfig
from minifusion.fusion import GatedFusion, binary_entropy
from minifusion.model import MiniFusionForCausalLM, parameter_breakdown_of

PATTERNS = {
    "hybrid-dense": dict(mixer_types=["hybrid"] * 2, ffn_types=["dense"] * 2),
    "llama": dict(mixer_types=["attention"] * 2, ffn_types=["dense"] * 2),
    "mamba": dict(mixer_types=["mamba"] * 2, ffn_types=["none"] * 2),
    "jamba": dict(mixer_types=["attention", "mamba", "mamba", "attention"],
                  ffn_types=["moe", "dense", "moe", "dense"], num_hidden_layers=4),
    "everything": dict(mixer_types=["hybrid", "attention", "mamba", "hybrid"],
                       ffn_types=["dense", "moe", "none", "moe"], num_hidden_layers=4),
}  # fmt: skip


def small_config(pattern: str = "everything", **overrides) -> MiniFusionConfig:
    settings = dict(
        vocab_size=61, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, sliding_window=6, num_global_heads=2, moe_num_experts=4,
        moe_top_k=2, moe_num_shared_experts=1, fusion_gate_rank=8, mamba_d_state=8,
        mamba_chunk_size=8, max_position_embeddings=128,
    )  # fmt: skip
    settings.update(PATTERNS[pattern])
    settings.update(overrides)
    return MiniFusionConfig(**settings)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(
    "variant",
    [{}, {"tie_word_embeddings": False}, {"fusion_gate": "scalar"},
     {"fusion_gate": "average", "fusion_branch_norm": False}, {"attention_bias": True}],
)  # fmt: skip
def test_parameter_count_equals_config_estimate(pattern, variant):
    config = small_config(pattern, **variant)
    model = MiniFusionForCausalLM(config)
    assert model.num_parameters() == config.estimate_parameters()
    assert parameter_breakdown_of(model) == config.parameter_breakdown()


@pytest.mark.parametrize("preset", ["tiny", "small", "fusiontree-1.5b"])
def test_parameter_count_equals_estimate_for_presets(preset):
    config = MiniFusionConfig.from_preset(preset)
    with torch.device("meta"):  # count without allocating 1.5 B parameters
        model = MiniFusionForCausalLM(config)
    assert model.num_parameters() == config.estimate_parameters()


def test_loss_is_the_sum_of_its_reported_terms():
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config())
    ids = torch.randint(0, 61, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 61)
    expected_lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61),
                                                    ids[:, 1:].reshape(-1))  # fmt: skip
    torch.testing.assert_close(out.lm_loss, expected_lm)
    terms = out.lm_loss + out.moe_aux_loss + out.gate_balance_loss + out.gate_entropy_loss
    torch.testing.assert_close(out.loss, terms)
    assert out.moe_aux_loss > 0 and out.gate_entropy_loss < 0
    # no MoE and no hybrid layer: those terms are exactly zero
    plain = MiniFusionForCausalLM(small_config("llama"))(ids, labels=ids)
    assert plain.moe_aux_loss == 0 and plain.gate_balance_loss == 0
    assert plain.gate_entropy_loss == 0


@pytest.mark.parametrize("gate", ["lowrank", "scalar"])
@pytest.mark.parametrize("term", ["gate_balance_loss", "gate_entropy_loss"])
def test_gate_regularisers_send_gradient_into_the_gate(gate, term):
    torch.manual_seed(0)
    config = small_config("hybrid-dense", fusion_gate=gate, gate_balance_target=0.2)
    model = MiniFusionForCausalLM(config)
    with torch.no_grad():  # move the gate away from ½, where the entropy term is flat
        for name, p in model.named_parameters():
            if "gate_down" in name or "gate_logit" in name:
                p.add_(0.7)
    out = model(torch.randint(0, 61, (2, 10)))
    getattr(out, term).backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if ".fusion.gate_" in n]
    assert gate_grads and all(g is not None and g.abs().sum() > 0 for g in gate_grads)


def test_regularisers_match_their_formulas():
    torch.manual_seed(0)
    fusion = GatedFusion(small_config("hybrid-dense"))
    m, a = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    fusion(m, a)
    g = fusion.last_gate
    terms = fusion.regularisers()
    torch.testing.assert_close(terms["gate_balance"], 0.05 * (g.mean() - 0.5) ** 2)
    torch.testing.assert_close(terms["gate_entropy"], -3e-4 * binary_entropy(g).mean())
    torch.testing.assert_close(fusion.gate_mean, g.detach().mean())
    torch.testing.assert_close(fusion.gate_channel_mean, g.detach().mean((0, 1)))
    assert math.isclose(binary_entropy(torch.tensor(0.5)).item(), math.log(2), rel_tol=1e-6)


def test_gate_statistics_do_not_break_compile():
    fusion = GatedFusion(small_config("hybrid-dense"))
    compiled = torch.compile(fusion, backend="aot_eager", fullgraph=True)
    m = torch.randn(1, 4, 32, requires_grad=True)
    out = compiled(m, torch.randn(1, 4, 32))
    out.sum().backward()
    assert m.grad is not None and 0 < fusion.gate_mean < 1


def test_save_and_reload_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config(tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.moe is not None:
                layer.moe.router.expert_bias.uniform_(-1, 1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MiniFusionForCausalLM)
    ids = torch.randint(0, 61, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    mamba = reloaded.model.layers[0].mamba
    assert mamba.A_log.dtype == torch.float32
    # loading in bf16 keeps Mamba's state-space parameters in fp32, and the model still runs
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    mamba = half.model.layers[0].mamba
    assert mamba.in_proj.weight.dtype == torch.bfloat16
    assert mamba.A_log.dtype == mamba.D.dtype == mamba.dt_proj.bias.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(half(ids).logits.float()).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config("hybrid-dense"))
    ids = torch.randint(0, 61, (2, 10))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    model.model.layers[0].input_layernorm.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    plain = gradients()
    assert len(calls) == 1
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert len(calls) == 3  # the checkpointed layer ran again during the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recomputed_layers_leave_the_gate_and_no_activations_behind(use_reentrant):
    """Whole-layer checkpointing runs each layer again inside backward. That pass must not
    replace ``last_gate``: the recomputed gate's graph would keep the layer's recomputed
    activations allocated after the step (the live tensors the step created, counted exactly,
    would then exceed those of the same step without checkpointing)."""
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config("hybrid-dense")).train()
    ids = torch.randint(0, 61, (2, 10))
    fusions = [layer.fusion for layer in model.model.layers if layer.fusion is not None]

    def step() -> list[torch.Tensor]:
        loss = model(ids, labels=ids).loss
        gates = [fusion.last_gate for fusion in fusions]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return gates

    step()  # lazily created state (optimizer-free here, but caches, RoPE tables) outside the count
    with LiveTensorBytes() as plain:
        step()
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    with LiveTensorBytes() as checkpointed:
        gates = step()
    assert fusions and all(f.last_gate is g for f, g in zip(fusions, gates, strict=True))
    assert 0 < plain.peak and checkpointed.live_after <= plain.live_after


def test_branch_checkpointing_recomputes_only_the_branches_and_keeps_the_gradients():
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config("hybrid-dense", hidden_dropout=0.1,
                                               drop_path_rate=0.5))  # fmt: skip
    ids = torch.randint(0, 61, (2, 10))
    layer = model.model.layers[0]
    calls = {"attn": 0, "mamba": 0, "mlp": 0}
    for name in calls:  # count forward calls (a recompute does not run the module's hooks)
        module = getattr(layer, name)

        def counted(*args, name=name, forward=module.forward):
            calls[name] += 1
            return forward(*args)

        module.forward = counted

    def gradients():
        torch.manual_seed(1)  # the same dropout and DropPath draws in both runs
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    assert calls == {"attn": 1, "mamba": 1, "mlp": 1}
    model.checkpoint_branches()
    checkpointed = gradients()
    assert calls == {"attn": 3, "mamba": 3, "mlp": 2}  # the branches ran again in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert calls["attn"] == 4  # not recomputed outside training


def test_initialisation_scales_residual_projections_and_keeps_mamba_init():
    torch.manual_seed(0)
    config = small_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          fusion_gate_rank=32, intermediate_size=512)  # fmt: skip
    model = MiniFusionForCausalLM(config)
    layer = model.model.layers[0]
    std = config.initializer_range
    residual_std = std / math.sqrt(2 * config.num_hidden_layers)
    assert abs(layer.attn.q_proj.weight.std().item() - std) < 0.1 * std
    for projection in (layer.attn.o_proj, layer.mamba.out_proj, layer.fusion.fusion_proj,
                       layer.mlp.down_proj):  # fmt: skip
        assert abs(projection.weight.std().item() - residual_std) < 0.1 * residual_std
    n = config.mamba_d_state
    torch.testing.assert_close(layer.mamba.A_log[0], torch.log(torch.arange(1.0, n + 1)))
    dt = torch.nn.functional.softplus(layer.mamba.dt_proj.bias)
    assert dt.min() >= config.mamba_dt_min * 0.999 and dt.max() <= config.mamba_dt_max * 1.001
    assert torch.all(layer.fusion.gate_down.bias == 0) and torch.all(
        layer.input_layernorm.weight == 1
    )


def test_model_is_causal_and_left_padding_changes_nothing():
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config()).eval()
    ids = torch.randint(1, 61, (1, 16))
    with torch.no_grad():
        logits = model(ids).logits
        changed = ids.clone()
        changed[0, 9] = (changed[0, 9] + 1) % 61
        difference = (model(changed).logits - logits).abs().amax(-1)[0]
        assert difference[:9].max() == 0 and difference[9:].min() > 0
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 16)], dim=1).long()
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 5:], logits,
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_hidden_dropout_acts_on_the_residual_branches_in_training_only():
    torch.manual_seed(0)
    ids = torch.randint(0, 61, (2, 7))
    model = MiniFusionForCausalLM(small_config("everything", hidden_dropout=0.5))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)  # a new mask every call
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    plain = MiniFusionForCausalLM(small_config("everything"))
    assert all(
        isinstance(layer.mixer_residual.dropout, torch.nn.Identity) for layer in plain.model.layers
    )
