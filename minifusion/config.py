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

The class is spread over three modules, one idea each:

* this one — the fields and their defaults, the sizes derived from them, and the YAML presets;
* :mod:`minifusion.config_checks` — the validation (:class:`~minifusion.config_checks.
  ConfigChecksMixin`) and the values each string field allows;
* :mod:`minifusion.config_costs` — the accounting of parameters, FLOPs and cache bytes
  (:class:`~minifusion.config_costs.ConfigCostsMixin`).

``MiniFusionConfig`` inherits both mixins, so their methods are called on the config as before
(``config.parameter_breakdown()``), and the constants they took along are still importable from
here.
"""

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Validation and accounting are mixins defined in their own modules; the constants they hold are
# re-exported, so ``from minifusion.config import ROPE_TYPES`` (and the like) keeps working.
from .config_checks import (  # noqa: F401
    ATTENTION_IMPLS,
    BALANCE_LOSSES,
    FFN_TYPES,
    FUSION_GATES,
    MIXER_TYPES,
    ROPE_TYPES,
    ROUTER_SCORINGS,
    SCAN_IMPLS,
    SRTE_TYPES,
    XPOS_MAX_EXPONENT,
    ConfigChecksMixin,
)
from .config_costs import (  # noqa: F401
    SCAN_FLOPS_PER_STATE,
    SCAN_STATE_BYTES,
    ConfigCostsMixin,
    _average_keys_seen,
)

__all__ = [
    "FFN_TYPES",
    "FUSION_GATES",
    "MIXER_TYPES",
    "PRESETS_DIR",
    "MiniFusionConfig",
    "list_presets",
    "swiglu_intermediate_size",
]

#: Where the YAML presets live (``configs/`` at the repository root).
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


def swiglu_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    """The SwiGLU "8/3 rule": ``8/3 · hidden`` rounded *up* to a multiple of ``multiple_of``.

    A plain MLP with a 4× hidden layer has ``2 · 4H² = 8H²`` weights. SwiGLU has three matrices
    (gate, up, down), so keeping the same parameter budget gives ``3 · H · I = 8H²``, i.e.
    ``I = 8H/3``. Rounding to a multiple of 64 keeps the matmuls friendly to GPU tiles.
    """
    raw = 8 * hidden_size / 3
    return int(math.ceil(raw / multiple_of) * multiple_of)


@strict
class MiniFusionConfig(ConfigCostsMixin, ConfigChecksMixin, PreTrainedConfig):
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
    # QK-norm (OLMo 2, Qwen3, Gemma 3): every head's query and key scaled to unit RMS, times a
    # learned gain, before RoPE — the logits q·k/√d cannot grow with the weights' scale
    attention_qk_norm: bool = False
    # Gated attention (Qwen3-Next; Qiu et al. 2025): every head's output times sigmoid(g_proj(x))
    # before o_proj, so a head can pass nothing on instead of parking its weight on a sink token
    attention_output_gate: bool = False
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
    # The rules are ConfigChecksMixin's methods (config_checks.py); __post_init__ runs them too.
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

    def global_heads_of(self, layer_idx: int) -> int:
        """Global query heads in layer ``layer_idx``: ``num_global_heads`` in the layers of
        ``global_attention_layers`` (all attention layers when that is None), 0 elsewhere."""
        layers = self.global_attention_layers
        return self.num_global_heads if layers is None or layer_idx in layers else 0

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
