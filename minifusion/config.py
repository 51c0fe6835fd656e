"""Chapter 01 — ``MiniFusionConfig``: every hyperparameter of the model in one validated place.

The config is a Hugging Face ``PreTrainedConfig`` (``model_type = "minifusion"``), so it saves and
loads with ``save_pretrained`` / ``from_pretrained`` and later plugs into ``AutoConfig``. It also
reads and writes the YAML presets in ``configs/``.

Two promises later chapters rely on:

* **Validation.** A config that cannot build a model raises ``ValueError`` naming the field(s)
  and the fix, at construction time — never a shape error deep inside a forward pass.
* **Exact accounting.** :meth:`MiniFusionConfig.parameter_breakdown` lists the size of every
  weight the model will create; chapter 11 asserts that ``model.num_parameters()`` equals
  :meth:`MiniFusionConfig.estimate_parameters` for every preset.

A note on names: design.md calls the per-layer mixer list ``layer_types``. In transformers 5,
``PreTrainedConfig`` claims ``layer_types`` for its own vocabulary (it rewrites ``"attention"`` to
``"full_attention"`` and ``"mamba"`` to ``"linear_attention"`` and rejects ``"hybrid"``), so the
field is called :attr:`mixer_types` here. Passing ``layer_types=[...]`` to the constructor still
works and is moved to ``mixer_types``.
"""

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

__all__ = [
    "FFN_TYPES",
    "FUSION_GATES",
    "MIXER_TYPES",
    "PRESETS_DIR",
    "MiniFusionConfig",
    "list_presets",
    "swiglu_intermediate_size",
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

#: Where the YAML presets live (``configs/`` at the repository root).
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"

# Constants of the FLOP model (see ``flops_breakdown``): per channel and state, one selective-scan
# step costs Δ·A, Δ·B·u (2), Ā·h + B̄u (2) and the read-out C·h (2): seven floating-point ops.
SCAN_FLOPS_PER_STATE = 7
#: Bytes per value of a Mamba layer's scan state in a cache: fp32 whatever the model's dtype.
SCAN_STATE_BYTES = 4


def swiglu_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    """The SwiGLU "8/3 rule": ``8/3 · hidden`` rounded *up* to a multiple of ``multiple_of``.

    A plain MLP with a 4× hidden layer has ``2 · 4H² = 8H²`` weights. SwiGLU has three matrices
    (gate, up, down), so keeping the same parameter budget gives ``3 · H · I = 8H²``, i.e.
    ``I = 8H/3``. Rounding to a multiple of 64 keeps the matmuls friendly to GPU tiles.
    """
    raw = 8 * hidden_size / 3
    return int(math.ceil(raw / multiple_of) * multiple_of)


def _average_keys_seen(seq_len: int, window: int | None) -> float:
    """Mean number of keys a causal query attends to over positions 0..T-1.

    A global head at position t sees t+1 keys (itself included); a local head sees at most
    ``window`` of them (its own position counts as one of the ``window``).
    """
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..W-1 see t+1 keys; positions W..T-1 see exactly W keys
    ramp = window * (window + 1) / 2
    return (ramp + (seq_len - window) * window) / seq_len


@strict
class MiniFusionConfig(PreTrainedConfig):
    """All hyperparameters of a MiniFusion model (see chapter 01 for the intuition of each).

    Sizes left at ``None`` are derived: ``num_key_value_heads`` → ``num_attention_heads`` (MHA),
    ``head_dim`` → ``hidden_size // num_attention_heads``, ``intermediate_size`` → the SwiGLU 8/3
    rule, ``moe_intermediate_size`` → ``intermediate_size``, ``num_global_heads`` → all heads when
    there is no sliding window, ``mixer_types`` → all ``"hybrid"``, ``ffn_types`` → all ``"dense"``,
    ``mamba_dt_rank="auto"`` → ``ceil(hidden_size / 16)``.
    """

    model_type = "minifusion"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # --- vocabulary and width -------------------------------------------------------------
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-5
    hidden_dropout: float | int = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    use_cache: bool = True

    # --- attention --------------------------------------------------------------------------
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    attention_impl: str = "sdpa"
    rope_parameters: dict | None = None
    # XPos (chapter 05): rotary pairs also decay with distance, pair i by ζ_i^((n−m)/scale_base)
    xpos_scale_base: int | None = None
    sliding_window: int | None = None
    num_global_heads: int | None = None
    # Layers whose first num_global_heads heads are global; every head of the other attention
    # layers is local (as Gemma and Hymba keep full attention in only a few layers). None: all.
    global_attention_layers: list[int] | None = None

    # --- layer pattern ----------------------------------------------------------------------
    mixer_types: list[str] | None = None
    ffn_types: list[str] | None = None
    # Hybrid layers pruned to one branch (chapter 15): their mixer_types entry names the branch
    # kept, and they keep that branch's fusion norm and fusion_proj (the gate is gone).
    pruned_fusion_layers: list[int] | None = None

    # --- feed-forward (SwiGLU) --------------------------------------------------------------
    intermediate_size: int | None = None
    intermediate_multiple_of: int = 64
    hidden_act: str = "silu"

    # --- Mamba ------------------------------------------------------------------------------
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_dt_min: float | int = 1e-3
    mamba_dt_max: float | int = 0.1
    mamba_dt_init_floor: float | int = 1e-4
    mamba_scan_impl: str = "auto"
    mamba_chunk_size: int = 64

    # --- block variants (chapter 11): how each sublayer's output joins the residual stream ----
    parallel_residual: bool = False
    deepnorm: bool = False
    layer_scale_init: float | int | None = None
    drop_path_rate: float | int = 0.0

    # --- fusion of the two branches ---------------------------------------------------------
    fusion_gate: str = "lowrank"
    fusion_gate_rank: int = 96
    fusion_branch_norm: bool = True
    gate_balance_coef: float | int = 0.05
    gate_balance_target: float | int = 0.5
    gate_entropy_coef: float | int = 3e-4
    # SRTE (chapter 10): one time encoding shared by every layer, added to the Mamba branch's
    # input. None (off), "sinusoidal" (fixed) or "learned" (a table, started at the sinusoid).
    srte: str | None = None

    # --- Mixture-of-Experts -----------------------------------------------------------------
    moe_num_experts: int = 8
    moe_top_k: int = 2
    moe_num_shared_experts: int = 0
    moe_intermediate_size: int | None = None
    moe_router_scoring: str = "softmax"
    moe_norm_topk_prob: bool = True
    moe_aux_loss_coef: float | int = 0.01
    moe_balance_loss: str = "global"
    moe_router_z_loss_coef: float | int = 0.0
    moe_aux_loss_free_bias: bool = False
    moe_bias_update_rate: float | int = 1e-3
    moe_capacity_factor: float | int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # design.md's name for the mixer list; see the module docstring for why it moved.
        legacy_layer_types = kwargs.pop("layer_types", None)
        if legacy_layer_types is not None:
            if self.mixer_types is not None and list(self.mixer_types) != list(legacy_layer_types):
                raise ValueError(
                    "Both `layer_types` and `mixer_types` were given and they differ; pass only "
                    "`mixer_types` (the per-layer list of 'attention' / 'mamba' / 'hybrid')."
                )
            self.mixer_types = list(legacy_layer_types)
        # Positive sizes are checked before anything is derived from them (no division by zero).
        self._check_positive_sizes()
        self._fill_derived_defaults()
        self._check_consistency()
        if (
            self.rope_parameters is None
            and "rope_theta" not in kwargs
            and "rope_scaling" not in kwargs
        ):
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        self._check_rope()

    # ------------------------------------------------------------------ derived defaults ---
    def _fill_derived_defaults(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_intermediate_size(
                self.hidden_size, self.intermediate_multiple_of
            )
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_global_heads is None:
            self.num_global_heads = self.num_attention_heads if self.sliding_window is None else 0
        if self.mixer_types is None:
            self.mixer_types = ["hybrid"] * self.num_hidden_layers
        if self.ffn_types is None:
            self.ffn_types = ["dense"] * self.num_hidden_layers
        self.mixer_types = list(self.mixer_types)
        self.ffn_types = list(self.ffn_types)
        self.pruned_fusion_layers = sorted(int(i) for i in self.pruned_fusion_layers or [])
        if self.global_attention_layers is not None:
            self.global_attention_layers = sorted(int(i) for i in self.global_attention_layers)

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

    def global_heads_of(self, layer_idx: int) -> int:
        """Global query heads in layer ``layer_idx``: ``num_global_heads`` in the layers of
        ``global_attention_layers`` (all attention layers when that is None), 0 elsewhere."""
        layers = self.global_attention_layers
        return self.num_global_heads if layers is None or layer_idx in layers else 0

    def cache_bytes(self, tokens: int, batch_size: int = 1, bytes_per_value: int = 4) -> int:
        """Bytes a :class:`~minifusion.cache.HybridCache` holds after a ``tokens``-token prompt.

        Per attention layer: keys + values of its global KV heads for every token and of its
        local KV heads for ``sliding_window`` slots (the ring is allocated whole at the first
        token, however short the prompt). Per Mamba layer: the conv buffer ``(d_inner, d_conv)``
        in the model's dtype (``bytes_per_value``) and the scan state ``(d_inner, d_state)``,
        which is always fp32 (:data:`SCAN_STATE_BYTES`: the recurrence accumulates in fp32),
        whatever ``tokens``. With every head global this is a plain transformer's KV cache.
        (While decoding past the prompt the global buffers grow by eighths, so they may hold up
        to about 1/8 more.)
        """
        group = self.num_attention_heads // self.num_key_value_heads
        state_bytes = self.mamba_d_inner * self.mamba_d_state * SCAN_STATE_BYTES
        total = 0
        for i, mixer in enumerate(self.mixer_types):
            if mixer in ("attention", "hybrid"):
                global_kv = self.global_heads_of(i) // group
                local_kv = self.num_key_value_heads - global_kv
                window = self.sliding_window if local_kv and tokens else 0
                values = 2 * self.head_dim * (global_kv * tokens + local_kv * window)
                total += values * bytes_per_value
            if mixer in ("mamba", "hybrid"):
                total += self.mamba_d_inner * self.mamba_d_conv * bytes_per_value + state_bytes
        return total * batch_size

    @staticmethod
    def _divisors_hint(n: int) -> str:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        return ", ".join(str(d) for d in divisors[:8]) + (", …" if len(divisors) > 8 else "")

    def check(self) -> None:
        """Re-run the validation (useful after editing fields of an existing config)."""
        self._check_positive_sizes()
        self._check_consistency()
        self._check_rope()

    # ---------------------------------------------------------------------- derived sizes ---
    @property
    def mamba_d_inner(self) -> int:
        """Width of the Mamba branch's inner stream: ``expand · hidden_size``."""
        return self.mamba_expand * self.hidden_size

    @property
    def resolved_dt_rank(self) -> int:
        """Rank of the Δ projection: ``ceil(hidden_size / 16)`` when ``mamba_dt_rank == "auto"``."""
        if self.mamba_dt_rank == "auto":
            return math.ceil(self.hidden_size / 16)
        return int(self.mamba_dt_rank)

    @property
    def rope_theta(self) -> float:
        """The RoPE base θ (stored inside ``rope_parameters`` as in transformers 5)."""
        params = self.rope_parameters or {}
        return float(params.get("rope_theta", self.default_theta))

    @property
    def num_local_heads(self) -> int:
        return self.num_attention_heads - self.num_global_heads

    # ----------------------------------------------------------------------- parameters ---
    def _attention_parameters(self) -> dict[str, int]:
        """Weights of q/k/v/o (from :meth:`_attention_matmul_sizes`) plus their optional biases."""
        weights = dict(
            zip(("q_proj", "k_proj", "v_proj", "o_proj"), self._attention_matmul_sizes())
        )
        if not self.attention_bias:
            return weights
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        biases = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": self.hidden_size}
        return {name: weights[name] + biases[name] for name in weights}

    def _mamba_parameters(self) -> dict[str, int]:
        h, di = self.hidden_size, self.mamba_d_inner
        n, r, k = self.mamba_d_state, self.resolved_dt_rank, self.mamba_d_conv
        proj_bias = self.mamba_proj_bias
        return {
            "in_proj": h * 2 * di + (2 * di if proj_bias else 0),
            "conv1d": di * k
            + (di if self.mamba_conv_bias else 0),  # depthwise: one filter per channel
            "x_proj": di * (r + 2 * n),
            "dt_proj": r * di + di,  # its bias holds the Δ initialisation
            "A_log": di * n,
            "D": di,
            "out_proj": di * h + (h if proj_bias else 0),
        }

    def _fusion_parameters(self) -> dict[str, int]:
        h, r = self.hidden_size, self.fusion_gate_rank
        gate = {
            "lowrank": 2 * h * r + r * h + h,  # up: [m; a] (2H) → r, down: r → H with a bias
            "scalar": 1,
            "average": 0,
        }[self.fusion_gate]
        return {
            "gate": gate,
            "branch_norms": 2 * h if self.fusion_branch_norm else 0,
            "fusion_proj": h * h,
        }

    def _ffn_parameters(self, ffn_type: str) -> dict[str, int]:
        h = self.hidden_size
        if ffn_type == "none":
            return {}
        if ffn_type == "dense":
            return {"post_attention_layernorm": h, "mlp": 3 * h * self.intermediate_size}
        expert = 3 * h * self.moe_intermediate_size
        return {
            "post_attention_layernorm": h,
            "router": h * self.moe_num_experts,
            "experts": self.moe_num_experts * expert,
            "shared_experts": self.moe_num_shared_experts * expert,
        }

    def layer_parameter_breakdown(self, layer_idx: int) -> dict[str, int]:
        """Parameter count of every weight group in layer ``layer_idx``."""
        mixer, ffn = self.mixer_types[layer_idx], self.ffn_types[layer_idx]
        counts: dict[str, int] = {"input_layernorm": self.hidden_size}
        if mixer in ("attention", "hybrid"):
            counts.update({f"attn.{k}": v for k, v in self._attention_parameters().items()})
        if mixer in ("mamba", "hybrid"):
            counts.update({f"mamba.{k}": v for k, v in self._mamba_parameters().items()})
        if mixer == "hybrid":
            counts.update({f"fusion.{k}": v for k, v in self._fusion_parameters().items()})
        elif layer_idx in self.pruned_fusion_layers:  # one branch norm and the projection remain
            fusion = self._fusion_parameters()
            counts["fusion.branch_norms"] = fusion["branch_norms"] // 2
            counts["fusion.fusion_proj"] = fusion["fusion_proj"]
        counts.update({f"ffn.{k}": v for k, v in self._ffn_parameters(ffn).items()})
        if self.parallel_residual:  # the FFN reads the mixer's normalised input: one norm
            counts.pop("ffn.post_attention_layernorm", None)
        if self.layer_scale_init is not None:  # one per-channel gain per residual branch
            counts["layer_scale"] = self.hidden_size * self._residual_branches(layer_idx)
        return counts

    def _residual_branches(self, layer_idx: int) -> int:
        """Sublayers of layer ``layer_idx`` that add to the residual stream: mixer (+ FFN)."""
        return 1 + (self.ffn_types[layer_idx] != "none")

    def parameter_breakdown(self) -> dict[str, int]:
        """Total parameters per component, summed over layers (zero entries omitted).

        Keys: ``embed_tokens``, ``lm_head`` (0 when tied, omitted), ``final_norm`` and
        ``<group>.<weight>`` for the per-layer weights, e.g. ``attn.q_proj`` or ``ffn.experts``.
        """
        totals: dict[str, int] = {"embed_tokens": self.vocab_size * self.hidden_size}
        if not self.tie_word_embeddings:
            totals["lm_head"] = self.vocab_size * self.hidden_size
        for i in range(self.num_hidden_layers):
            for name, count in self.layer_parameter_breakdown(i).items():
                totals[name] = totals.get(name, 0) + count
        totals["final_norm"] = self.hidden_size
        if self.srte == "learned":  # one table for the whole model
            totals["srte"] = self.max_position_embeddings * self.hidden_size
        return {k: v for k, v in totals.items() if v}

    def estimate_parameters(self) -> int:
        """Exact number of trainable parameters of the model this config builds."""
        return sum(self.parameter_breakdown().values())

    def estimate_active_parameters(self) -> int:
        """Parameters that touch one token: only ``top_k`` of the routed experts count."""
        total = self.estimate_parameters()
        n_moe = sum(1 for t in self.ffn_types if t == "moe")
        idle = (
            (self.moe_num_experts - self.moe_top_k)
            * 3
            * self.hidden_size
            * self.moe_intermediate_size
        )
        return total - n_moe * idle

    # ---------------------------------------------------------------------------- FLOPs ---
    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token, by component, averaged over a sequence of ``seq_len`` tokens.

        Counted (2 FLOPs per multiply-add): every matrix multiplication including the LM head;
        attention's ``QKᵀ`` and ``AV`` over the keys each causal query actually sees (local heads
        see at most ``sliding_window``); Mamba's depthwise convolution and selective scan
        (``7 · d_inner · d_state`` per token); and, when switched on, the block variants'
        elementwise terms (``layer_scale``, ``deepnorm``, ``srte``). Not counted: norms,
        activations, softmax, the embedding lookup and bias additions — together a few percent
        at these sizes. (DropPath multiplies each kept branch by ``1/(1−p)`` while training: one
        more multiply per channel and branch, none at inference.)
        """
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be ≥ 1.")
        h = self.hidden_size
        out: dict[str, float] = {"lm_head": 2.0 * h * self.vocab_size}

        def add(name: str, flops: float) -> None:
            out[name] = out.get(name, 0.0) + flops

        attn_proj = 2.0 * sum(self._attention_matmul_sizes())
        keys_global = _average_keys_seen(seq_len, None)
        keys_local = _average_keys_seen(seq_len, self.sliding_window)

        def scores(layer_idx: int) -> float:  # QKᵀ and AV over the keys each query sees
            global_heads = self.global_heads_of(layer_idx)
            local_heads = self.num_attention_heads - global_heads
            return 2 * 2.0 * self.head_dim * (
                global_heads * keys_global + local_heads * keys_local
            )

        di, n, r = self.mamba_d_inner, self.mamba_d_state, self.resolved_dt_rank
        mamba_proj = 2.0 * (h * 2 * di + di * (r + 2 * n) + r * di + di * h)
        mamba_conv = 2.0 * di * self.mamba_d_conv
        mamba_scan = float(SCAN_FLOPS_PER_STATE * di * n)
        rank = self.fusion_gate_rank
        gate = 2.0 * (2 * h * rank + rank * h) if self.fusion_gate == "lowrank" else 0.0
        for i, (mixer, ffn) in enumerate(zip(self.mixer_types, self.ffn_types)):
            if mixer in ("attention", "hybrid"):
                add("attention_projections", attn_proj)
                add("attention_scores", scores(i))
            if mixer in ("mamba", "hybrid"):
                add("mamba_projections", mamba_proj)
                add("mamba_conv", mamba_conv)
                add("mamba_scan", mamba_scan)
            if mixer == "hybrid":
                add("fusion", gate + 2.0 * h * h)
            elif i in self.pruned_fusion_layers:
                add("fusion", 2.0 * h * h)
            if ffn == "dense":
                add("ffn", 2.0 * 3 * h * self.intermediate_size)
            elif ffn == "moe":
                active = self.moe_top_k + self.moe_num_shared_experts
                add("moe_router", 2.0 * h * self.moe_num_experts)
                add("ffn", 2.0 * 3 * h * self.moe_intermediate_size * active)
            # Block variants' elementwise work, listed so their (small) cost is visible:
            # LayerScale's γ·f and DeepNorm's α·x, one multiply per channel and branch; SRTE,
            # one addition per channel at the Mamba branch's input. (XPos folds its decay into
            # the rotary tables: no extra work per token.)
            branches = self._residual_branches(i)
            if self.layer_scale_init is not None:
                add("layer_scale", float(h * branches))
            if self.deepnorm:
                add("deepnorm", float(h * branches))
            if self.srte is not None and mixer in ("mamba", "hybrid"):
                add("srte", float(h))
        return out

    def _attention_matmul_sizes(self) -> list[int]:
        """Weight-matrix sizes of q_proj, k_proj, v_proj, o_proj (shared by counts and FLOPs)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return [h * q, h * kv, h * kv, q * h]

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length ``seq_len`` (see :meth:`flops_breakdown`).

        Training (forward + backward) costs about three times this.
        """
        return float(sum(self.flops_breakdown(seq_len).values()))

    # ----------------------------------------------------------------------------- YAML ---
    def replaced(self, **changes: Any) -> "MiniFusionConfig":
        """A copy with ``changes`` applied, checked like a new config (this one is unchanged).

        Derived sizes (``head_dim``, ``intermediate_size``, ``num_global_heads``, …) are copied as
        they are, not derived again: to change ``hidden_size`` or the head count, build a new
        config from the original arguments instead.
        """
        values = self.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            values.pop(key, None)
        return type(self)(**{**values, **changes})

    def to_yaml(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the config as a preset: a ``model:`` section (+ optional other sections)."""
        document = {"model": {f: getattr(self, f) for f in sorted(_OWN_FIELDS)}}
        document.update(extra or {})
        Path(path).write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "MiniFusionConfig":
        """Read a preset: the file's ``model:`` section (or the whole file if it has none)."""
        document = _read_yaml(path)
        return cls.from_section(document.get("model", document), where=str(path), **overrides)

    @classmethod
    def from_section(
        cls, section: Any, *, where: str = "the model section", **overrides: Any
    ) -> "MiniFusionConfig":
        """A preset's ``model:`` mapping, checked field by field (``where`` names it in errors)."""
        if not isinstance(section, dict):
            raise ValueError(f"{where}: the 'model' section must be a mapping of field: value.")
        unknown = sorted(set(section) - _OWN_FIELDS - _BASE_FIELDS - _ACCEPTED_ALIASES)
        if unknown:
            raise ValueError(
                f"{where}: unknown model field(s) {unknown}. Check the spelling against "
                "MiniFusionConfig's fields (chapter 01 lists them all)."
            )
        return cls(**_coerce_numeric_strings({**section, **overrides}))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MiniFusionConfig":
        """Load ``configs/<name>.yaml`` (``tiny``, ``small``, ``fusiontree-1.5b``)."""
        path = PRESETS_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(
                f"Unknown preset {name!r}; available: {list_presets()} (files in {PRESETS_DIR})."
            )
        return cls.from_yaml(path, **overrides)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level.")
    return document


def _coerce_numeric_strings(values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-5`` (no dot) as a *string*; turn such strings back into floats."""
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and name in _FLOAT_FIELDS:
            try:
                out[name] = float(value)
            except ValueError:
                pass  # left for the type check to report with the field's name
    return out


def list_presets() -> list[str]:
    """Names of the model presets in ``configs/`` (DeepSpeed JSON files are not presets)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


_BASE_FIELDS = {f.name for f in fields(PreTrainedConfig)}
_OWN_FIELDS = {f.name for f in fields(MiniFusionConfig)} - _BASE_FIELDS
_FLOAT_FIELDS = {f.name for f in fields(MiniFusionConfig) if "float" in str(f.type)} | {
    "rope_theta"
}
# Keys accepted in presets besides the fields: transformers' legacy RoPE keys and design.md's name.
_ACCEPTED_ALIASES = {"rope_theta", "rope_scaling", "layer_types"}
