"""Chapter 01 — validation: the rules a :class:`~minifusion.config.MiniFusionConfig`
must follow to build a model, each broken one reported with the field(s) and the fix.

:class:`ConfigChecksMixin` holds the checks; ``MiniFusionConfig`` inherits them and runs them at
construction time (``__post_init__``) and again in ``check()``. Their methods read the config's
fields through ``self`` and add none, so nothing here reaches ``config.json``. The values the
string fields allow (:data:`MIXER_TYPES`, :data:`FUSION_GATES`, …) are defined here as well and
stay importable from :mod:`minifusion.config`.

Sizes are checked first, before anything is derived from them; the rules that relate fields to
one another are then gathered into one ``ValueError`` that lists every broken one; RoPE's
settings come last, once transformers' own ``__post_init__`` has turned the legacy
``rope_theta`` / ``rope_scaling`` arguments into ``rope_parameters``.
"""

__all__ = [
    "ATTENTION_IMPLS",
    "BALANCE_LOSSES",
    "FFN_TYPES",
    "FUSION_GATES",
    "MIXER_TYPES",
    "ROPE_TYPES",
    "ROUTER_SCORINGS",
    "SCAN_IMPLS",
    "SRTE_TYPES",
    "XPOS_MAX_EXPONENT",
    "ConfigChecksMixin",
]

MIXER_TYPES = ("attention", "mamba", "hybrid")
FFN_TYPES = ("dense", "moe", "none")
FUSION_GATES = ("lowrank", "scalar", "average")
SCAN_IMPLS = ("auto", "sequential", "chunked", "fused", "cuda")
ATTENTION_IMPLS = ("sdpa", "eager")
ROUTER_SCORINGS = ("softmax", "sigmoid")
BALANCE_LOSSES = ("global", "sequence")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
SRTE_TYPES = (None, "sinusoidal", "learned")
# XPos's largest scale factor is (1/ζ_0)^(max_position_embeddings / 2 / scale_base) with
# 1/ζ_0 = 3.5; an exponent of 8 gives 2.3e4, inside fp16's range (6.5e4).
XPOS_MAX_EXPONENT = 8


class ConfigChecksMixin:
    """The validation methods of ``MiniFusionConfig`` (they read its fields through ``self``)."""

    # ------------------------------------------------------------------------ validation ---
    def _check_positive_sizes(self) -> None:
        sizes = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "intermediate_multiple_of",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "mamba_chunk_size",
            "fusion_gate_rank",
            "moe_num_experts",
            "moe_top_k",
        ]
        optional_sizes = [
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "moe_intermediate_size",
            "xpos_scale_base",
        ]
        bad = [name for name in sizes if getattr(self, name) <= 0]
        bad += [
            name
            for name in optional_sizes
            if getattr(self, name) is not None and getattr(self, name) <= 0
        ]
        if isinstance(self.mamba_dt_rank, int) and self.mamba_dt_rank <= 0:
            bad.append("mamba_dt_rank")
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"These sizes must be positive integers: {values}. Use values ≥ 1.")
        if self.moe_num_shared_experts < 0:
            raise ValueError(
                f"moe_num_shared_experts={self.moe_num_shared_experts} is negative; use 0 for no "
                "shared expert."
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"sliding_window={self.sliding_window} must be ≥ 1: it is the number of keys a local "
                "head sees, its own position included. Use None for full causal attention."
            )

    def _check_consistency(self) -> None:
        errors: list[str] = []
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if self.head_dim is None:  # only left unset when hidden_size % heads != 0
            errors.append(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}, "
                "so each head cannot get an equal slice. Choose num_attention_heads among the "
                f"divisors of {self.hidden_size} (e.g. {self._divisors_hint(self.hidden_size)}), "
                "or set head_dim explicitly."
            )
        if heads % kv_heads != 0:
            errors.append(
                f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}: "
                "in grouped-query attention every key/value head serves the same number of query "
                f"heads. Use a divisor of {heads} (e.g. {self._divisors_hint(heads)})."
            )
        if kv_heads > heads:
            errors.append(
                f"num_key_value_heads={kv_heads} exceeds num_attention_heads={heads}; use at most "
                f"{heads} (that is plain multi-head attention)."
            )
        global_heads = self.num_global_heads
        if not 0 <= global_heads <= heads:
            errors.append(
                f"num_global_heads={global_heads} must be between 0 and num_attention_heads={heads}."
            )
        elif self.sliding_window is None and global_heads != heads:
            errors.append(
                f"num_global_heads={global_heads} < num_attention_heads={heads} but sliding_window is "
                "None, so the local heads would have no window. Set sliding_window (e.g. 256) or "
                "num_global_heads=num_attention_heads."
            )
        elif heads % kv_heads == 0 and 0 < global_heads < heads:
            group = heads // kv_heads
            if global_heads % group != 0:
                errors.append(
                    f"num_global_heads={global_heads} is not a multiple of the query-group size "
                    f"{group} (= num_attention_heads / num_key_value_heads). A key/value head shared "
                    "by a global and a local query head would have to keep every key, defeating "
                    "the windowed cache. Use a multiple of "
                    f"{group} for num_global_heads, or change num_key_value_heads."
                )
        errors += self._check_layer_list("mixer_types", MIXER_TYPES)
        errors += self._check_layer_list("ffn_types", FFN_TYPES)
        errors += self._check_pruned_layers()
        errors += self._check_global_layers()
        if self.moe_top_k > self.moe_num_experts:
            errors.append(
                f"moe_top_k={self.moe_top_k} exceeds moe_num_experts={self.moe_num_experts}: a "
                "token cannot be routed to more experts than exist. Lower moe_top_k or add experts."
            )
        choices = [
            ("fusion_gate", FUSION_GATES),
            ("mamba_scan_impl", SCAN_IMPLS),
            ("attention_impl", ATTENTION_IMPLS),
            ("moe_router_scoring", ROUTER_SCORINGS),
            ("moe_balance_loss", BALANCE_LOSSES),
        ]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                errors.append(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act={self.hidden_act!r} is not supported; SwiGLU uses 'silu'.")
        if isinstance(self.mamba_dt_rank, str) and self.mamba_dt_rank != "auto":
            errors.append(f"mamba_dt_rank={self.mamba_dt_rank!r} must be a positive int or 'auto'.")
        if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
            errors.append(
                f"mamba_dt_min={self.mamba_dt_min} and mamba_dt_max={self.mamba_dt_max} must satisfy "
                "0 < mamba_dt_min ≤ mamba_dt_max."
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1).")
        if not 0 < self.gate_balance_target < 1:
            errors.append(
                f"gate_balance_target={self.gate_balance_target} must be strictly between 0 and 1 "
                "(it is the mean gate value the balance term pulls toward)."
            )
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            errors.append(
                f"moe_capacity_factor={self.moe_capacity_factor} must be positive, or None for "
                "dropless routing."
            )
        errors += self._check_block_variants()
        if errors:
            raise ValueError("Invalid MiniFusionConfig:\n  - " + "\n  - ".join(errors))

    def _check_block_variants(self) -> list[str]:
        errors = []
        if not 0 <= self.drop_path_rate < 1:
            errors.append(
                f"drop_path_rate={self.drop_path_rate} must be in [0, 1): it is the chance that "
                "the deepest layer's sublayers are skipped for a sample (0 turns DropPath off)."
            )
        if self.layer_scale_init is not None and self.layer_scale_init <= 0:
            errors.append(
                f"layer_scale_init={self.layer_scale_init} must be positive (CaiT uses 0.1 up to "
                "18 layers, 1e-5 at 24, 1e-6 deeper), or None for no LayerScale."
            )
        if self.deepnorm and self.parallel_residual:
            errors.append(
                "deepnorm and parallel_residual are both on. DeepNorm normalises after each "
                "sublayer's residual addition (post-norm), which needs the sublayers in sequence; "
                "turn one of them off."
            )
        if self.srte not in SRTE_TYPES:
            errors.append(f"srte={self.srte!r} is not one of {list(SRTE_TYPES)}.")
        elif self.srte is not None and not any(m in ("mamba", "hybrid") for m in self.mixer_types):
            errors.append(
                f"srte={self.srte!r} adds a time encoding to the Mamba branch, but no layer has "
                "one (mixer_types has no 'mamba' or 'hybrid'). Set srte=None."
            )
        if self.xpos_scale_base is not None and (
            self.max_position_embeddings / 2 / self.xpos_scale_base > XPOS_MAX_EXPONENT
        ):
            errors.append(
                f"xpos_scale_base={self.xpos_scale_base} is too small for "
                f"max_position_embeddings={self.max_position_embeddings}: XPos scales a query "
                "by ζ^(n/B) and a key by ζ^(−m/B), and at the table's ends the largest factor, "
                f"(1.4/0.4)^({self.max_position_embeddings // 2}/{self.xpos_scale_base}), would "
                "overflow 16-bit floats. Use xpos_scale_base ≥ max_position_embeddings / "
                f"{2 * XPOS_MAX_EXPONENT} (the paper's 512 suits up to 8,192 positions)."
            )
        if self.xpos_scale_base is not None and not any(
            m in ("attention", "hybrid") for m in self.mixer_types
        ):
            errors.append(
                "xpos_scale_base is set but no layer has attention, where XPos acts. Set "
                "xpos_scale_base=None."
            )
        return errors

    def _check_rope(self) -> None:
        params = self.rope_parameters or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_parameters['rope_type']={rope_type!r} is not supported; use one of "
                f"{list(ROPE_TYPES)} (YaRN for extending the context of a trained model)."
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "rope_parameters['partial_rotary_factor'] is not supported: MiniFusion rotates "
                "the whole head_dim. Remove the key."
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} is odd; RoPE rotates channels in pairs, so head_dim must "
                "be even. Change head_dim (or hidden_size / num_attention_heads)."
            )

    def _check_layer_list(self, name: str, allowed: tuple[str, ...]) -> list[str]:
        values = getattr(self, name)
        errors = []
        if len(values) != self.num_hidden_layers:
            errors.append(
                f"{name} has {len(values)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "give exactly one entry per layer."
            )
        unknown = sorted({v for v in values if v not in allowed}, key=str)
        if unknown:
            errors.append(f"{name} contains unknown type(s) {unknown}; allowed: {list(allowed)}.")
        return errors

    def _check_pruned_layers(self) -> list[str]:
        errors = []
        for i in self.pruned_fusion_layers:
            if not 0 <= i < self.num_hidden_layers:
                errors.append(
                    f"pruned_fusion_layers contains {i}, but layers are numbered 0.."
                    f"{self.num_hidden_layers - 1}; list only existing layers."
                )
            elif i < len(self.mixer_types) and self.mixer_types[i] not in ("attention", "mamba"):
                errors.append(
                    f"pruned_fusion_layers contains layer {i}, whose mixer is "
                    f"{self.mixer_types[i]!r}: a pruned layer keeps one branch, so its mixer_types "
                    "entry must be 'attention' or 'mamba' (minifusion.prune writes both fields)."
                )
        return errors

    def _check_global_layers(self) -> list[str]:
        layers = self.global_attention_layers
        if layers is None:
            return []
        errors = []
        attention = [i for i, m in enumerate(self.mixer_types) if m in ("attention", "hybrid")]
        stray = [i for i in layers if i not in attention]
        if stray:
            errors.append(
                f"global_attention_layers contains {stray}, which are not attention or hybrid "
                f"layers; the attention layers of this config are {attention}. List only those "
                "(or None for all of them)."
            )
        if self.sliding_window is None and any(i not in layers for i in attention):
            errors.append(
                "global_attention_layers leaves some attention layers without global heads, so "
                "every head there is local, but sliding_window is None. Set sliding_window (e.g. "
                "256) or global_attention_layers=None."
            )
        if layers and self.num_global_heads == 0:
            errors.append(
                "global_attention_layers names layers but num_global_heads=0, so no head anywhere "
                "is global. Set num_global_heads (how many heads are global in those layers)."
            )
        return errors

    @staticmethod
    def _divisors_hint(n: int) -> str:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        return ", ".join(str(d) for d in divisors[:8]) + (", …" if len(divisors) > 8 else "")
