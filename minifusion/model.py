"""Chapter 11 — the full causal language model, as a Hugging Face ``PreTrainedModel``.

One decoder layer (``config.mixer_types[i]``, ``config.ffn_types[i]``)::

    x ─► input_layernorm ─┬─► attn  (attention | hybrid) ─┐
                          └─► mamba (mamba | hybrid) ─────┴─► fusion (hybrid only) ─► + x
    x ─► post_attention_layernorm ─► mlp (SwiGLU) | moe (MoE) ─► + x        (ffn ≠ "none")

A ``"attention"`` layer is a Llama layer, a ``"mamba"`` layer with ``ffn="none"`` a Mamba block,
and ``"hybrid"`` runs both branches on the same normalised input and mixes them with a gate
(chapter 10). The stack: ``embed_tokens`` → layers → ``norm`` → ``lm_head`` (tied to the embedding
or not). One :class:`~minifusion.rope.RotaryEmbedding` serves every attention layer.

**Loss** = cross-entropy (next token) + the MoE auxiliary losses + the gate regularisers; each
term is returned on its own in :class:`MiniFusionCausalLMOutput`.

**Initialisation** (:meth:`MiniFusionPreTrainedModel._init_weights`, one place for all of it):

* linear layers and the embedding: ``N(0, initializer_range²)``, biases 0;
* *residual output projections* — the ones whose output is added to the residual stream:
  ``o_proj``, Mamba's ``out_proj``, ``fusion_proj``, ``down_proj`` of the dense FFN and of every
  expert — get ``initializer_range / sqrt(2 · num_hidden_layers)``, so the residual stream's
  variance does not grow with depth (GPT-2, Radford et al., 2019);
* norms: weight 1;
* Mamba's own parameters are left to mamba-ssm's scheme (:meth:`MambaMixer.reset_ssm_parameters`:
  ``A_log``, ``D``, ``dt_proj``) and its depthwise ``conv1d`` keeps PyTorch's default;
* the fusion gate's bias starts at 0 (``g ≈ ½``), the scalar gate at 0.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .attention import Attention
from .blocks import LayerScale, Residual, deepnorm_coefficients, xavier_std
from .cache import HybridCache
from .compat import cache_argument, model_output
from .config import MiniFusionConfig
from .embedding import TokenEmbedding
from .fusion import GatedFusion
from .mamba import MambaMixer
from .mlp import SwiGLU
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .time_encoding import SharedTimeEncoding

__all__ = [
    "MiniFusionCausalLMOutput",
    "parameter_breakdown_of",
    "MiniFusionDecoderLayer",
    "MiniFusionForCausalLM",
    "MiniFusionModel",
    "MiniFusionModelOutput",
]


@model_output  # a dataclass whose `cache` field takes the installed transformers' name
class MiniFusionModelOutput(ModelOutput):
    """``last_hidden_state (B, T, H)``; the summed auxiliary losses of the layers."""

    last_hidden_state: torch.Tensor | None = None
    cache: HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    moe_aux_loss: torch.Tensor | None = None
    gate_balance_loss: torch.Tensor | None = None
    gate_entropy_loss: torch.Tensor | None = None


@model_output
class MiniFusionCausalLMOutput(ModelOutput):
    """``loss = lm_loss + moe_aux_loss + gate_balance_loss + gate_entropy_loss``.

    ``logits`` is ``(B, T, V)``; the loss terms are scalars (``loss`` and ``lm_loss`` only when
    ``labels`` are given).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    lm_loss: torch.Tensor | None = None
    moe_aux_loss: torch.Tensor | None = None
    gate_balance_loss: torch.Tensor | None = None
    gate_entropy_loss: torch.Tensor | None = None


class MiniFusionDecoderLayer(GradientCheckpointingLayer):
    """One layer: ``(B, T, H)`` → ``(B, T, H)``, plus its auxiliary loss terms.

    The sublayers join the residual stream through :class:`~minifusion.blocks.Residual`
    (LayerScale, DropPath, DeepNorm when configured); with ``parallel_residual`` the FFN reads
    the mixer's normalised input and both add at once; with ``deepnorm`` the two norms sit
    *after* each residual addition (post-norm) instead of before each sublayer.
    """

    def __init__(self, config: MiniFusionConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.mixer_types[layer_idx]
        self.ffn_type = config.ffn_types[layer_idx]
        self.deepnorm = config.deepnorm
        self.parallel_residual = config.parallel_residual and self.ffn_type != "none"
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        has_attention = self.mixer_type in ("attention", "hybrid")
        has_mamba = self.mixer_type in ("mamba", "hybrid")
        self.attn = Attention(config, layer_idx) if has_attention else None
        self.mamba = MambaMixer(config, layer_idx) if has_mamba else None
        self.fusion = None
        if self.mixer_type == "hybrid":
            self.fusion = GatedFusion(config, layer_idx)
        elif layer_idx in config.pruned_fusion_layers:  # a hybrid layer pruned to one branch
            self.fusion = GatedFusion(config, layer_idx, keep=self.mixer_type)
        if self.ffn_type != "none" and not self.parallel_residual:
            self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.mlp = SwiGLU(config) if self.ffn_type == "dense" else None
        self.moe = MoE(config, layer_idx) if self.ffn_type == "moe" else None
        self.mixer_residual = Residual(config, layer_idx)
        self.ffn_residual = Residual(config, layer_idx) if self.ffn_type != "none" else None
        # Branch-selective checkpointing (FusionTree): recompute only the attention and Mamba
        # branches in backward (see MiniFusionPreTrainedModel.checkpoint_branches).
        self.checkpoint_branches = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        layer_cache: object | None = None,
        time_encoding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``time_encoding`` ``(B or 1, T, H)``: SRTE's shared encoding, added to the Mamba
        branch's input (chapter 10); ``None`` when the config has none."""
        losses: dict[str, torch.Tensor] = {}
        # Pre-norm: each sublayer reads norm(x). DeepNorm: x is already normalised (post-norm).
        normed = hidden_states if self.deepnorm else self.input_layernorm(hidden_states)
        mixed = self._mix(normed, position_embeddings, attention_mask, layer_cache, time_encoding)
        if self.fusion is not None and (layer_cache is None or self.training):
            # (generation needs no gate losses: skipping them saves a few operations per token)
            losses.update(self.fusion.regularisers())
        if self.parallel_residual:  # x + mix(norm x) + ffn(norm x)
            ffn_out = self._feed_forward(normed, losses)
            hidden_states = self.ffn_residual(hidden_states, ffn_out)
            return self.mixer_residual(hidden_states, mixed), losses
        post_norm = self.input_layernorm if self.deepnorm else None
        hidden_states = self.mixer_residual(hidden_states, mixed, post_norm)
        if self.ffn_type != "none":
            post_norm = self.post_attention_layernorm if self.deepnorm else None
            normed = hidden_states if self.deepnorm else self.post_attention_layernorm(hidden_states)
            ffn_out = self._feed_forward(normed, losses)
            hidden_states = self.ffn_residual(hidden_states, ffn_out, post_norm)
        return hidden_states, losses

    def _mix(self, normed, position_embeddings, attention_mask, layer_cache, time_encoding):
        """The mixer sublayer: attention and/or Mamba on ``normed``, fused in hybrid layers."""
        kv_cache = getattr(layer_cache, "kv", None)
        mamba_state = getattr(layer_cache, "mamba", None)
        attn_out = mamba_out = None
        recompute = self.checkpoint_branches and self.training and torch.is_grad_enabled()
        run = _recomputed if recompute else _called
        if self.attn is not None:
            attn_out = run(self.attn, normed, position_embeddings, attention_mask, kv_cache)
        if self.mamba is not None:
            mamba_in = normed if time_encoding is None else normed + time_encoding
            mamba_out = run(self.mamba, mamba_in, mamba_state, attention_mask)
        if self.fusion is not None:
            return self.fusion(mamba_out, attn_out, decoding=layer_cache is not None)
        return attn_out if attn_out is not None else mamba_out

    def _feed_forward(self, normed: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The FFN sublayer (SwiGLU or MoE); an MoE's auxiliary loss goes into ``losses``."""
        if self.moe is None:
            return self.mlp(normed)
        moe_output = self.moe(normed)
        losses["moe_aux"] = moe_output.aux_loss
        return moe_output.hidden_states


def _called(module: nn.Module, *args):
    return module(*args)


def _recomputed(module: nn.Module, *args):
    """``module(*args)``, keeping only its inputs for backward: the activations inside are
    computed again there (non-reentrant checkpointing; the RNG state is replayed)."""
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


# Modules whose output is added to the residual stream (their init is scaled with depth).
_RESIDUAL_PROJECTIONS = ("o_proj", "out_proj", "fusion_proj", "down_proj")
# DeepNet's init: Xavier-normal with gain β for the weights that carry values to the residual
# (attention's v/o, the FFN's, and — by the same role — Mamba's in/out and the fusion's output
# projection), gain 1 for queries and keys. Other weights keep the model's usual init.
_DEEPNORM_GAINS = {"q_proj": "one", "k_proj": "one", "v_proj": "beta", "o_proj": "beta",
                   "gate_proj": "beta", "up_proj": "beta", "down_proj": "beta",
                   "in_proj": "beta", "out_proj": "beta", "fusion_proj": "beta"}  # fmt: skip


class _DeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


@contextlib.contextmanager
def _without_deepspeed_cpu_notice():
    """Drop DeepSpeed's "Setting accelerator to CPU" notice while the block runs.

    Where accelerate is installed, transformers' ``save_pretrained`` imports DeepSpeed, whose
    first accelerator lookup prints that timestamped line on stdout on every machine without a
    GPU: noise in each export's log and in notebook outputs. Training with DeepSpeed (chapter 14)
    looks the accelerator up itself and still reports it.
    """
    logger, notice = logging.getLogger("DeepSpeed"), _DeepSpeedCpuNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class MiniFusionPreTrainedModel(PreTrainedModel):
    config_class = MiniFusionConfig
    config: MiniFusionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniFusionDecoderLayer"]
    _keep_in_fp32_modules_strict = ["A_log", "D", "dt_proj"]
    _is_stateful = True

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``, plus this package's modelling code and a model
        card: the folder then loads with ``AutoModelForCausalLM.from_pretrained(folder,
        trust_remote_code=True)`` in a Python that never imports MiniFusion (see ``hub.py``)."""
        with _without_deepspeed_cpu_notice():
            super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .hub import write_model_card, write_remote_code

            write_remote_code(save_directory)
            write_model_card(save_directory, self.config, self.num_parameters())

    def checkpoint_branches(self, enable: bool = True) -> None:
        """Branch-selective activation checkpointing (FusionTree's "selective checkpoint").

        Whole-layer checkpointing (``activation_checkpointing_enable``) keeps only each layer's
        input and recomputes the whole layer in backward. This keeps everything except what is
        *inside* the attention and Mamba branches — their projections, scores, scan — and
        recomputes just those; the norms, gate and FFN keep their activations. It therefore
        saves less memory than whole layers and recomputes less; chapter 12 measures the three
        (none, branches, layers) on the ``small`` preset.
        """
        for layer in self.modules():
            if isinstance(layer, MiniFusionDecoderLayer):
                layer.checkpoint_branches = bool(enable)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, MambaMixer):
            module.reset_ssm_parameters(self.config)  # A_log, D, dt_proj (mamba-ssm)
            return
        if isinstance(module, nn.Linear):
            if getattr(module, "_init_managed_by_parent", False):
                return
            gain = getattr(module, "_deepnorm_gain", None)
            if gain is not None:  # DeepNet: Xavier-normal, gain β for value/output/FFN weights
                std = xavier_std(module.in_features, module.out_features, gain)
            elif getattr(module, "_residual_projection", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GatedFusion):
            if module.kind == "scalar":
                init.zeros_(module.gate_logit)
            init.constant_(module.gate_mean, 0.5)
            init.zeros_(module.gate_std)
            init.constant_(module.gate_channel_mean, 0.5)
        elif isinstance(module, (RotaryEmbedding, SharedTimeEncoding)):
            module.reset()
        elif isinstance(module, LayerScale):
            init.constant_(module.gamma, module.init)
        elif isinstance(module, MoE):
            init.zeros_(module.router.expert_bias)
            init.zeros_(module.load_since_update)

    def _mark_parameter_roles(self) -> None:
        """Tag the linear layers whose init differs from the default (read by _init_weights)."""
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            module._residual_projection = leaf in _RESIDUAL_PROJECTIONS
            module._init_managed_by_parent = leaf == "dt_proj"  # mamba-ssm's Δ initialisation
            if self.config.deepnorm and leaf in _DEEPNORM_GAINS:
                beta = deepnorm_coefficients(self.config.num_hidden_layers)[1]
                module._deepnorm_gain = beta if _DEEPNORM_GAINS[leaf] == "beta" else 1.0


class MiniFusionModel(MiniFusionPreTrainedModel):
    """Embedding → decoder layers → final norm: ``input_ids (B, T)`` → ``(B, T, H)``."""

    def __init__(self, config: MiniFusionConfig):
        super().__init__(config)
        self.embed_tokens = TokenEmbedding(config)
        self.layers = nn.ModuleList(
            MiniFusionDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        has_attention = any(t in ("attention", "hybrid") for t in config.mixer_types)
        self.rotary_emb = RotaryEmbedding(config) if has_attention else None
        self.srte = SharedTimeEncoding(config) if config.srte is not None else None
        self.gradient_checkpointing = False
        self._mark_parameter_roles()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens.embed_tokens = value
        self.embed_tokens.vocab_size = value.num_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        past_key_values: HybridCache | None = None,
        **kwargs,
    ) -> MiniFusionModelOutput:
        """``cache``: a :class:`HybridCache` to read and extend (``past_key_values=`` works too)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        cache = cache_argument(cache, past_key_values)
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        past = cache.seen_tokens if cache is not None else 0
        if _nothing_padded(attention_mask, (batch, past + length)):
            attention_mask = None  # every layer (and the positions) take the mask-free path
        if position_ids is None:
            position_ids = _positions(attention_mask, past, length, hidden_states.device)
        position_embeddings = None
        if self.rotary_emb is not None:
            position_embeddings = self.rotary_emb(position_ids, dtype=hidden_states.dtype)
        time_encoding = None
        if self.srte is not None:
            time_encoding = self.srte(position_ids, dtype=hidden_states.dtype)

        totals: dict[str, torch.Tensor] = {}
        all_hidden = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            hidden_states, losses = layer(
                hidden_states, position_embeddings, attention_mask, layer_cache, time_encoding
            )
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value
            if output_hidden_states:
                all_hidden.append(hidden_states)
        if cache is not None:
            cache.seen_tokens += length
        hidden_states = self.norm(hidden_states)
        zero = hidden_states.new_zeros((), dtype=torch.float32)
        return MiniFusionModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            moe_aux_loss=totals.get("moe_aux", zero),
            gate_balance_loss=totals.get("gate_balance", zero),
            gate_entropy_loss=totals.get("gate_entropy", zero),
        )


def _nothing_padded(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> bool:
    """A CPU mask of all ones of the expected ``(batch, past + new)`` shape (what ``generate()``
    passes for an unpadded batch at every step): checked once per forward instead of in every
    layer. (A mask of another shape is left to the layers, whose error names the fix; on a GPU
    the check would wait for the device, so the layers handle the mask there.)"""
    return (
        attention_mask is not None
        and attention_mask.device.type == "cpu"
        and tuple(attention_mask.shape) == shape
        and bool(attention_mask.all())
    )


def _positions(attention_mask, past: int, length: int, device) -> torch.Tensor:
    """Position of every new token: counted over real tokens only when a mask is given, so a
    left-padded row starts at 0 like the unpadded one. ``(B, T)`` or ``(1, T)``.

    (transformers' Llama, called without ``position_ids``, numbers positions 0, 1, 2, … whatever
    the mask; with RoPE only differences of positions matter, so the two agree for left
    padding, but not for a mask with zeros in the middle — pass ``position_ids`` there.)"""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -length:]


class MiniFusionForCausalLM(MiniFusionPreTrainedModel, GenerationMixin):
    """The language model: ``MiniFusionModel`` + ``lm_head``; ``labels`` give the loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.embed_tokens.weight"}

    def __init__(self, config: MiniFusionConfig):
        super().__init__(config)
        self.model = MiniFusionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # MiniFusionModel has already tagged its layers' init roles

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation uses our HybridCache (created below), not transformers' caches

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        past_key_values: HybridCache | None = None,
        **kwargs,
    ) -> dict:
        """First step: the whole prompt (and a new cache); later steps: only the new tokens.

        ``generate()`` passes the cache back under the name of the installed release
        (:mod:`minifusion.compat`); a cache handed in by the caller continues where it stopped.
        """
        cache = cache_argument(cache, past_key_values)
        if use_cache and cache is None:
            cache = HybridCache(self.model, batch_size=input_ids.shape[0])
        if cache is not None and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        past_key_values: HybridCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MiniFusionCausalLMOutput:
        """``cache``: a :class:`HybridCache` (``past_key_values=`` works too).

        ``use_cache=True`` without a cache starts a new one and returns it, so the loop every
        transformers user writes (``out = model(ids, use_cache=True)``, then
        ``model(next_id, past_key_values=out.past_key_values)``) continues from the prompt
        instead of silently starting over. Without ``use_cache`` no cache is made (training).
        """
        cache = cache_argument(cache, past_key_values)
        if use_cache and cache is None:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            cache = HybridCache(self.model, batch_size=batch)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            loss = (
                lm_loss
                + outputs.moe_aux_loss
                + outputs.gate_balance_loss
                + outputs.gate_entropy_loss
            )
        return MiniFusionCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            lm_loss=lm_loss,
            moe_aux_loss=outputs.moe_aux_loss,
            gate_balance_loss=outputs.gate_balance_loss,
            gate_entropy_loss=outputs.gate_entropy_loss,
        )


_FUSION_GROUPS = {"gate_up": "gate", "gate_down": "gate", "gate_logit": "gate",
                  "mamba_norm": "branch_norms", "attn_norm": "branch_norms",
                  "fusion_proj": "fusion_proj"}  # fmt: skip
_MOE_GROUPS = {"router": "router", "experts": "experts", "shared_experts": "shared_experts"}


def _breakdown_key(name: str) -> str:
    """A parameter name → its key in ``MiniFusionConfig.parameter_breakdown``."""
    parts = name.removeprefix("model.").split(".")
    if parts[0] != "layers":
        return {"embed_tokens": "embed_tokens", "lm_head": "lm_head", "norm": "final_norm",
                "srte": "srte"}[parts[0]]  # fmt: skip
    module, child = parts[2], parts[3]
    if module in ("mixer_residual", "ffn_residual"):
        return child  # "layer_scale"
    if module in ("attn", "mamba"):
        return f"{module}.{child}"
    if module == "fusion":
        return f"fusion.{_FUSION_GROUPS[child]}"
    if module == "mlp":
        return "ffn.mlp"
    if module == "moe":
        return f"ffn.{_MOE_GROUPS[child]}"
    if module == "post_attention_layernorm":
        return "ffn.post_attention_layernorm"
    return module  # input_layernorm


def parameter_breakdown_of(model: nn.Module) -> dict[str, int]:
    """Parameters of a built model, grouped under ``MiniFusionConfig.parameter_breakdown``'s keys
    (a tied ``lm_head`` counts once, as the embedding)."""
    totals: dict[str, int] = {}
    for name, parameter in model.named_parameters():  # shared parameters are listed once
        key = _breakdown_key(name)
        totals[key] = totals.get(key, 0) + parameter.numel()
    return totals


# In this Python, AutoModelForCausalLM.from_pretrained knows model_type "minifusion". A saved
# folder carries its own copy of this code without these two lines (hub.py): there the class
# is found through config.json's auto_map instead.
AutoConfig.register("minifusion", MiniFusionConfig, exist_ok=True)  # hub: package only
AutoModelForCausalLM.register(MiniFusionConfig, MiniFusionForCausalLM, exist_ok=True)  # hub: package only
