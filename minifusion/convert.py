"""Chapter 11 — converters: transformers' Llama, Mixtral and Mamba models as MiniFusion models.

One codebase expresses all three: a Llama is a MiniFusion model whose layers are all
``"attention"`` with ``"dense"`` FFNs, a Mixtral the same with ``"moe"`` FFNs, and a Mamba model
all ``"mamba"`` layers with no FFN. Each converter builds the matching
:class:`~minifusion.config.MiniFusionConfig`, renames the weights, and returns a
:class:`~minifusion.model.MiniFusionForCausalLM` that computes the same logits.
"""

from __future__ import annotations

import torch

from .config import MiniFusionConfig
from .model import MiniFusionForCausalLM
from .moe import moe_from_mixtral_state

__all__ = ["from_llama", "from_mamba", "from_mixtral"]

_EMBED = "model.embed_tokens.embed_tokens.weight"


def _special_tokens(source) -> dict:
    """The source's bos/eos/pad ids: generate() stops on eos, and pad marks padding."""
    return {
        name: getattr(source, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    }


def _attention_config(source, ffn: str, **extra) -> MiniFusionConfig:
    layers = source.num_hidden_layers
    return MiniFusionConfig(
        **_special_tokens(source),
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None),
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=dict(source.rope_parameters),
        attention_bias=getattr(source, "attention_bias", False),
        tie_word_embeddings=source.tie_word_embeddings,
        initializer_range=source.initializer_range,
        mixer_types=["attention"] * layers,
        ffn_types=[ffn] * layers,
        **extra,
    )


def _attention_layer_state(state: dict, i: int) -> dict[str, torch.Tensor]:
    """Norms and attention weights of layer ``i`` of a Llama/Mixtral state dict."""
    theirs, ours = f"model.layers.{i}.", f"model.layers.{i}."
    renamed = {
        f"{ours}input_layernorm.weight": state[f"{theirs}input_layernorm.weight"],
        f"{ours}post_attention_layernorm.weight": state[f"{theirs}post_attention_layernorm.weight"],
    }
    for key, value in state.items():
        if key.startswith(f"{theirs}self_attn."):
            renamed[f"{ours}attn." + key[len(f"{theirs}self_attn.") :]] = value
    return renamed


def _finish(config: MiniFusionConfig, renamed: dict, state: dict) -> MiniFusionForCausalLM:
    renamed[_EMBED] = state["model.embed_tokens.weight"]
    renamed["model.norm.weight"] = state["model.norm.weight"]
    if not config.tie_word_embeddings:
        renamed["lm_head.weight"] = state["lm_head.weight"]
    return _load(config, renamed)


def _load(config: MiniFusionConfig, renamed: dict) -> MiniFusionForCausalLM:
    model = MiniFusionForCausalLM(config)
    result = model.load_state_dict(renamed, strict=False)
    # buffers we keep that the source has no counterpart for (the MoE expert bias starts at 0)
    missing = [k for k in result.missing_keys if not k.endswith("router.expert_bias")]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"conversion left weights unmatched: missing {missing}, unexpected "
            f"{result.unexpected_keys}. The source model has a layout this converter does not "
            "know; please report it."
        )
    return model.eval()


def from_llama(model) -> MiniFusionForCausalLM:
    """transformers ``LlamaForCausalLM`` → an attention-only MiniFusion model with dense FFNs."""
    source = model.config
    if getattr(source, "mlp_bias", False):
        raise ValueError("Llama models with mlp_bias=True have no MiniFusion counterpart.")
    config = _attention_config(source, "dense", intermediate_size=source.intermediate_size)
    state = model.state_dict()
    renamed = {}
    for i in range(source.num_hidden_layers):
        renamed.update(_attention_layer_state(state, i))
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.{name}.weight"
            renamed[key] = state[key]
    return _finish(config, renamed, state)


def from_mixtral(model) -> MiniFusionForCausalLM:
    """transformers ``MixtralForCausalLM`` → an attention-only MiniFusion model with MoE FFNs.

    **The MoE auxiliary loss differs in form, not in scale.** Both use the Switch load-balancing
    loss ``E · Σᵢ fᵢ · Pᵢ`` (``fᵢ``: top-k assignments to expert ``i`` per token, ``Pᵢ``: its mean
    router probability), but from different statistics. Ours is computed in each layer from that
    layer's router alone — for layer ``l`` it equals transformers' ``load_balancing_loss_func``
    given layer ``l``'s router logits alone — and ``moe_aux_loss`` *sums* the layers'
    ``moe_aux_loss_coef · loss``. Mixtral computes *one* loss from statistics pooled over its
    ``L`` layers, ``E · Σᵢ f̄ᵢ · P̄ᵢ`` with ``f̄ᵢ``, ``P̄ᵢ`` the means over the layers, and adds
    ``router_aux_loss_coef`` times it. The converter sets ``moe_aux_loss_coef =
    router_aux_loss_coef / L``, so ours is ``c = router_aux_loss_coef`` times the *mean* of the
    per-layer losses, and::

        ours − theirs = c · E · Σᵢ cov_l(fₗᵢ, Pₗᵢ)     (population covariance over the L layers)

    They are equal when every layer routes alike (the same ``fᵢ`` and ``Pᵢ`` in every layer) and
    otherwise differ by that term (the unscaled coefficient would give ``L`` times ours). This
    holds for batches without padding: transformers leaves masked positions out of its
    statistics, ours counts every position. transformers computes the term only when called with
    ``output_router_logits=True`` (off by default in ``MixtralConfig``); ours always adds it to
    ``loss`` (``lm_loss`` is the cross-entropy alone). Mixtral has no router z-loss
    (``moe_router_z_loss_coef=0``).
    """
    source = model.config
    config = _attention_config(
        source,
        "moe",
        moe_num_experts=source.num_local_experts,
        moe_top_k=source.num_experts_per_tok,
        moe_intermediate_size=source.intermediate_size,
        moe_norm_topk_prob=True,
        # per-layer losses summed vs one pooled loss: see the docstring
        moe_aux_loss_coef=source.router_aux_loss_coef / source.num_hidden_layers,
        moe_balance_loss="global",
        moe_router_z_loss_coef=0.0,
    )
    if getattr(source, "sliding_window", None):
        raise ValueError(
            "Mixtral with sliding_window set is not converted (MiniFusion's local heads would "
            "need num_global_heads=0); convert a config with sliding_window=None."
        )
    state = model.state_dict()
    renamed = {}
    for i in range(source.num_hidden_layers):
        renamed.update(_attention_layer_state(state, i))
        prefix = f"model.layers.{i}.mlp."
        block = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        for key, value in moe_from_mixtral_state(block).items():
            renamed[f"model.layers.{i}.moe.{key}"] = value
    return _finish(config, renamed, state)


def from_mamba(model) -> MiniFusionForCausalLM:
    """transformers ``MambaForCausalLM`` → a Mamba-only MiniFusion model (no FFN)."""
    source = model.config
    layers = source.num_hidden_layers
    config = MiniFusionConfig(
        **_special_tokens(source),
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=1,  # unused: there is no attention layer
        rms_norm_eps=source.layer_norm_epsilon,
        tie_word_embeddings=source.tie_word_embeddings,
        initializer_range=source.initializer_range,
        mixer_types=["mamba"] * layers,
        ffn_types=["none"] * layers,
        mamba_d_state=source.state_size,
        mamba_d_conv=source.conv_kernel,
        mamba_expand=source.expand,
        mamba_dt_rank=int(source.time_step_rank),
        mamba_conv_bias=source.use_conv_bias,
        mamba_proj_bias=source.use_bias,
    )
    state = model.state_dict()
    renamed = {
        _EMBED: state["backbone.embeddings.weight"],
        "model.norm.weight": state["backbone.norm_f.weight"],
    }
    if not config.tie_word_embeddings:
        renamed["lm_head.weight"] = state["lm_head.weight"]
    for i in range(layers):
        renamed[f"model.layers.{i}.input_layernorm.weight"] = state[
            f"backbone.layers.{i}.norm.weight"
        ]
        prefix = f"backbone.layers.{i}.mixer."
        for key, value in state.items():
            if key.startswith(prefix):
                renamed[f"model.layers.{i}.mamba." + key[len(prefix) :]] = value
    return _load(config, renamed)
