"""Chapter 01 — what a :class:`~minifusion.config.MiniFusionConfig` costs, counted before
anything is built: parameters, forward FLOPs per token and cache memory.

:class:`ConfigCostsMixin` holds the accounting; ``MiniFusionConfig`` inherits it. Its methods
read the config's fields through ``self`` and add none, so nothing here reaches ``config.json``.

* :meth:`~ConfigCostsMixin.parameter_breakdown` lists the size of every weight the model will
  create; chapter 11 asserts that ``model.num_parameters()`` equals
  :meth:`~ConfigCostsMixin.estimate_parameters` for every preset.
* :meth:`~ConfigCostsMixin.flops_breakdown` is the FLOP model, component by component; the
  chapters of the components check their share against ``torch``'s ``FlopCounterMode``.
* :meth:`~ConfigCostsMixin.cache_breakdown` (summed by :meth:`~ConfigCostsMixin.cache_bytes`) is
  what a :class:`~minifusion.cache.HybridCache` holds after a prompt, part by part; the
  attention, Mamba and model chapters check it against ``memory_bytes()``, and
  :meth:`~ConfigCostsMixin.cache_crossover` is the context length from which one cache
  outgrows another (every chapter's KV-cache-vs-Mamba-state comparison).
"""

__all__ = ["SCAN_FLOPS_PER_STATE", "SCAN_STATE_BYTES", "ConfigCostsMixin"]

# Constants of the FLOP model (see ``flops_breakdown``): per channel and state, one selective-scan
# step costs Δ·A, Δ·B·u (2), Ā·h + B̄u (2) and the read-out C·h (2): seven floating-point ops.
SCAN_FLOPS_PER_STATE = 7
#: Bytes per value of a Mamba layer's scan state in a cache: fp32 whatever the model's dtype.
SCAN_STATE_BYTES = 4


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


class ConfigCostsMixin:
    """Parameter, FLOP and cache accounting of ``MiniFusionConfig`` (reads its fields)."""

    # ----------------------------------------------------------------------- parameters ---
    def _attention_parameters(self) -> dict[str, int]:
        """Weights of q/k/v/o and the output gate's g_proj (from :meth:`_attention_matmul_sizes`),
        QK-norm's gains, plus the projections' optional biases."""
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj")  # g_proj: the output gate
        weights = dict(zip(names, self._attention_matmul_sizes()))
        if self.attention_qk_norm:  # one gain vector over head_dim each, shared by all heads
            weights.update(q_norm=self.head_dim, k_norm=self.head_dim)
        if not self.attention_bias:
            return weights
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        biases = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": self.hidden_size, "g_proj": q}
        return {name: weights[name] + biases.get(name, 0) for name in weights}

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
        """Weight-matrix sizes of q_proj, k_proj, v_proj, o_proj and, with the output gate, g_proj
        (shared by counts and FLOPs)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return [h * q, h * kv, h * kv, q * h] + ([h * q] if self.attention_output_gate else [])

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length ``seq_len`` (see :meth:`flops_breakdown`).

        Training (forward + backward) costs about three times this.
        """
        return float(sum(self.flops_breakdown(seq_len).values()))

    # ---------------------------------------------------------------------------- cache ---
    def cache_breakdown(
        self, tokens: int, batch_size: int = 1, bytes_per_value: int = 4
    ) -> dict[str, int]:
        """Bytes of each part of a :class:`~minifusion.cache.HybridCache` after a ``tokens``-token
        prompt, summed over layers: the one formula every chapter's cache/state comparison uses.

        Keys (always all four, zero where the config has none):

        * ``"global_kv"`` — keys + values of the KV heads serving global query heads, every
          token: per attention layer ``i`` a buffer ``(B, H_g(i), tokens, head_dim)`` for K and
          one for V, ``2 · H_g(i) · head_dim · tokens`` values, with ``H_g(i) =
          global_heads_of(i) / group`` (GQA groups are never split between global and local);
        * ``"local_kv"`` — keys + values of the other ``H_l(i) = num_key_value_heads − H_g(i)``
          KV heads: a ring ``(B, H_l(i), sliding_window, head_dim)`` each for K and V, allocated
          whole at the first token (``2 · H_l(i) · head_dim · sliding_window`` values; none
          while ``tokens == 0``);
        * ``"mamba_conv"`` — per Mamba branch the conv buffer ``(B, d_inner, d_conv)``;
        * ``"mamba_ssm"`` — per Mamba branch the scan state ``(B, d_inner, d_state)``, always
          fp32 (:data:`SCAN_STATE_BYTES`), whatever ``bytes_per_value``.

        Everything but ``mamba_ssm`` is counted at ``bytes_per_value`` (the model's dtype: 4 in
        fp32, 2 in bf16). The Mamba parts do not depend on ``tokens``; for ``tokens ≥ 1`` the
        total is affine in ``tokens`` (see :meth:`cache_crossover`). With every head global
        (e.g. :func:`~minifusion.inference.full_attention_config`) this is a plain transformer's
        KV cache. ``memory_bytes()`` of a real cache reports ``{"kv": global_kv + local_kv,
        "mamba": mamba_conv + mamba_ssm}``.
        """
        if tokens < 0:
            raise ValueError(f"tokens={tokens} must be ≥ 0.")
        group = self.num_attention_heads // self.num_key_value_heads
        parts = dict.fromkeys(("global_kv", "local_kv", "mamba_conv", "mamba_ssm"), 0)
        for i, mixer in enumerate(self.mixer_types):
            if mixer in ("attention", "hybrid"):
                global_kv = self.global_heads_of(i) // group
                local_kv = self.num_key_value_heads - global_kv
                window = self.sliding_window if local_kv and tokens else 0
                parts["global_kv"] += 2 * self.head_dim * global_kv * tokens * bytes_per_value
                parts["local_kv"] += 2 * self.head_dim * local_kv * window * bytes_per_value
            if mixer in ("mamba", "hybrid"):
                parts["mamba_conv"] += self.mamba_d_inner * self.mamba_d_conv * bytes_per_value
                parts["mamba_ssm"] += self.mamba_d_inner * self.mamba_d_state * SCAN_STATE_BYTES
        return {name: value * batch_size for name, value in parts.items()}

    def cache_bytes(self, tokens: int, batch_size: int = 1, bytes_per_value: int = 4) -> int:
        """Bytes a :class:`~minifusion.cache.HybridCache` holds after a ``tokens``-token prompt.

        The sum of :meth:`cache_breakdown`. Per attention layer: keys + values of its global KV
        heads for every token and of its local KV heads for ``sliding_window`` slots (the ring is
        allocated whole at the first token, however short the prompt). Per Mamba layer: the conv
        buffer ``(d_inner, d_conv)`` in the model's dtype (``bytes_per_value``) and the scan state
        ``(d_inner, d_state)``, which is always fp32 (:data:`SCAN_STATE_BYTES`: the recurrence
        accumulates in fp32), whatever ``tokens``. With every head global this is a plain
        transformer's KV cache. (While decoding past the prompt the global buffers grow by
        eighths, so they may hold up to about 1/8 more.)
        """
        return sum(self.cache_breakdown(tokens, batch_size, bytes_per_value).values())

    def cache_crossover(self, other, batch_size: int = 1, bytes_per_value: int = 4) -> int | None:
        """The smallest prompt length ``n ≥ 1`` at which ``other``'s cache is **larger** than
        this config's: ``other.cache_bytes(n) > self.cache_bytes(n)``; ``None`` if it never is.

        The usual call is ``hybrid.cache_crossover(full_attention_config(hybrid))`` — from how
        many tokens on the transformer twin keeps more than the hybrid — or, for one layer, a
        Mamba-only config against an attention-only one of the same width. For ``n ≥ 1`` both
        totals are ``fixed + per_token · n`` (rings and Mamba states are fixed, global KV grows),
        so the answer is exact, without a search: ``n > (fixed_self − fixed_other) /
        (per_token_other − per_token_self)``. Both caches are counted at the same
        ``batch_size`` and ``bytes_per_value``.
        """

        def line(config) -> tuple[int, int]:  # (fixed, per token), valid for n ≥ 1
            one = config.cache_bytes(1, batch_size, bytes_per_value)
            per_token = config.cache_bytes(2, batch_size, bytes_per_value) - one
            return one - per_token, per_token

        fixed_self, slope_self = line(self)
        fixed_other, slope_other = line(other)
        if fixed_other + slope_other > fixed_self + slope_self:
            return 1
        if slope_other <= slope_self:
            return None
        return (fixed_self - fixed_other) // (slope_other - slope_self) + 1
