"""Chapter 05 — rotary position embeddings (RoPE), one shared cos/sin table, YaRN scaling.

RoPE (Su et al., 2021, "RoFormer") encodes a token's position by *rotating* its query and key
vectors. The ``head_dim`` channels are paired up; pair ``i`` is turned by the angle
``position · θ_i`` with ``θ_i = base^(−2i / head_dim)``: the first pairs spin fast (a clock's
second hand), the last ones slowly (its hour hand). Because a rotation by ``m·θ`` followed by the
inverse of a rotation by ``n·θ`` is a rotation by ``(m − n)·θ``, the dot product of a query at
position ``m`` and a key at position ``n`` depends only on the offset ``m − n`` — attention sees
relative positions without any learned position table.

Layout: like transformers' Llama, the two members of pair ``i`` are channels ``i`` and
``i + head_dim/2`` (the "half-rotation" layout), so weights and tables carry over unchanged.

One table for the whole model: ``cos(position · θ_i)`` and ``sin(...)`` do not depend on the
layer, so :class:`RotaryEmbedding` computes them once for every position up to a length, keeps
them as buffers (they follow ``model.to(device)``), grows them when a longer sequence arrives,
and every layer receives the same ``(cos, sin)`` slices.

Context-extension scalings, configured with transformers' ``rope_parameters`` dictionaries:

* ``"linear"`` (position interpolation, Chen et al., 2023): every frequency divided by ``factor``.
* ``"dynamic"`` (dynamic NTK): the base grows with the sequence length once it exceeds
  ``max_position_embeddings``.
* ``"yarn"`` (Peng et al., 2023, "YaRN: Efficient Context Window Extension of Large Language
  Models"): fast pairs (many turns within the original context) are kept, slow pairs (less than
  one turn) are interpolated by ``factor``, a linear ramp blends the two in between, and cos/sin
  are multiplied by an attention temperature ``0.1·ln(factor) + 1``.

**XPos** (Sun et al., 2022, "A Length-Extrapolatable Transformer"), with ``xpos_scale_base`` set:
pair ``i`` of a query at position ``n`` is also multiplied by ``ζ_i^(n/B)`` and of a key at ``m``
by ``ζ_i^(−m/B)``, where ``ζ_i = (2i/head_dim + γ)/(1 + γ)`` with ``γ = 0.4`` and ``B`` the scale
base (the paper uses 512). Their product ``ζ_i^((n−m)/B)`` is still a function of the offset
alone, and as ``ζ_i < 1`` it *decays* with distance — fast pairs (small ``i``, whose rotations
are the most erratic at long range) fade first, which is what helped the paper's models read
past their training length. The scales are folded into separate query and key tables, so XPos
costs no extra work per token; positions are measured from ``max_position_embeddings // 2``
(any fixed origin gives the same products) to keep both scales near 1 in low precision.
"""

import math
from typing import Any

import torch
from torch import nn

from .config import ROPE_TYPES, MiniFusionConfig
from .utils import as_dtype

__all__ = [
    "XPOS_GAMMA",
    "SUPPORTED_ROPE_TYPES",
    "RotaryEmbedding",
    "apply_rotary",
    "inverse_frequencies",
    "rotate_half",
]

SUPPORTED_ROPE_TYPES = ROPE_TYPES  # validated by MiniFusionConfig
XPOS_GAMMA = 0.4  # Sun et al. (2022): ζ_i = (2i/d + γ)/(1 + γ)


def xpos_decay(head_dim: int, gamma: float = XPOS_GAMMA) -> torch.Tensor:
    """XPos's per-pair decay ``ζ_i = (2i/head_dim + γ)/(1 + γ)`` ``(head_dim/2,)`` fp32."""
    pairs = torch.arange(0, head_dim, 2, dtype=torch.float32)
    return (pairs / head_dim + gamma) / (1 + gamma)


def _wavelength_scales(head_dim: int, base: float) -> torch.Tensor:
    """``base^(2i/head_dim)`` for the ``head_dim/2`` channel pairs, in fp32: ``1 / θ_i``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return base**exponents


def _base_inverse_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """``θ_i = base^(−2i/head_dim)`` for the ``head_dim/2`` channel pairs, in fp32."""
    return 1.0 / _wavelength_scales(head_dim, base)


def _yarn_temperature(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 · mscale · ln(factor) + 1`` (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_pair_index(turns: float, head_dim: int, base: float, context: int) -> float:
    """The (fractional) pair index whose wavelength fits ``turns`` times into ``context``.

    Pair ``i`` has wavelength ``λ_i = 2π · base^(2i/head_dim)``; solving ``context / λ_i = turns``
    for ``i`` gives ``i = head_dim · ln(context / (2π · turns)) / (2 · ln base)``.
    """
    return head_dim * math.log(context / (2 * math.pi * turns)) / (2 * math.log(base))


def _yarn_inverse_frequencies(
    head_dim: int, base: float, params: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    fast_turns = params.get("beta_fast") or 32  # pairs turning ≥ 32 times: keep as they are
    slow_turns = params.get("beta_slow") or 1  # pairs turning < 1 time: interpolate fully

    temperature = params.get("attention_factor")
    if temperature is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # DeepSeek's variant: a ratio of two temperatures
            temperature = _yarn_temperature(factor, mscale) / _yarn_temperature(
                factor, mscale_all_dim
            )
        else:
            temperature = _yarn_temperature(factor)

    # Pairs below `first` keep their frequency, pairs above `last` are divided by `factor`.
    first = _yarn_pair_index(fast_turns, head_dim, base, original)
    last = _yarn_pair_index(slow_turns, head_dim, base, original)
    if params.get("truncate", True):
        first, last = math.floor(first), math.ceil(last)
    first, last = max(first, 0), min(last, head_dim - 1)
    if first == last:
        last += 0.001  # a ramp of zero width would divide by zero

    pairs = torch.arange(head_dim // 2, dtype=torch.float32)
    keep_share = 1 - ((pairs - first) / (last - first)).clamp(0, 1)  # 1 = keep, 0 = stretch
    wavelength_scale = _wavelength_scales(head_dim, base)
    # Written as a blend of 1/scale and 1/(factor·scale), the same float operations as
    # transformers, so the two tables agree to the last bits even at large positions.
    inv_freq = (1.0 / (factor * wavelength_scale)) * (1 - keep_share) + (
        1.0 / wavelength_scale
    ) * keep_share
    return inv_freq, float(temperature)


def inverse_frequencies(
    config: MiniFusionConfig, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """The per-pair angular speeds ``θ`` ``(head_dim/2,)`` fp32, and the cos/sin multiplier.

    ``seq_len`` matters only for ``"dynamic"``: the longest sequence the table must cover.
    """
    params = dict(config.rope_parameters or {})
    rope_type = params.get("rope_type", "default")
    base, head_dim = float(params.get("rope_theta", config.rope_theta)), config.head_dim
    if rope_type == "default":
        return _base_inverse_frequencies(head_dim, base), 1.0
    if rope_type == "linear":
        return _base_inverse_frequencies(head_dim, base) / params["factor"], 1.0
    if rope_type == "dynamic":
        # NTK-aware: raise the base so the slowest pair still makes < 1 turn over `seq_len`.
        limit = config.max_position_embeddings
        seq_len = max(seq_len or limit, limit)
        factor = params["factor"]
        base = base * ((factor * seq_len / limit) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inverse_frequencies(head_dim, base), 1.0
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(head_dim, base, params, config.max_position_embeddings)
    raise ValueError(
        f"rope_type={rope_type!r} is not supported; use one of {list(SUPPORTED_ROPE_TYPES)}."
    )


class RotaryEmbedding(nn.Module):
    """The model's one cos/sin table. ``rope(position_ids)`` → ``(cos, sin)``, each ``(B, T, D)``.

    ``position_ids`` is ``(B, T)`` (or ``(T,)``, treated as a batch of one) with non-negative
    integer positions — for cached decoding simply the positions of the new tokens
    (``past_length + arange(T)``). ``D`` is ``head_dim``; rows are laid out ``[θ·m, θ·m]``
    (both halves equal), the half-rotation layout :func:`apply_rotary` expects.

    The table starts at ``max_position_embeddings`` rows (at most ``initial_length``) and doubles
    when a larger position arrives, so a long generation rebuilds it only a few times. For
    ``"dynamic"`` scaling the frequencies themselves depend on the length, so the table is rebuilt
    at exactly the length needed, and reset to the original frequencies when a sequence shorter
    than ``max_position_embeddings`` follows (as in transformers). It is stored in fp32; ``dtype``
    casts the returned slices.

    With XPos (``config.xpos_scale_base``) the call returns four tables,
    ``(cos_q, sin_q, cos_k, sin_k)``: the query tables carry ``ζ^(n/B)``, the key tables
    ``ζ^(−m/B)`` (see the module docstring). :func:`apply_rotary` takes either form.
    """

    def __init__(
        self,
        config: MiniFusionConfig,
        device: torch.device | str | None = None,
        initial_length: int = 4096,
    ):
        super().__init__()
        self.config = config
        # The config has already checked the rope type and that head_dim is even.
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        inv_freq, self.attention_scaling = inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        empty = torch.empty(0, config.head_dim, device=device)
        self.register_buffer("cos_table", empty, persistent=False)
        self.register_buffer("sin_table", empty.clone(), persistent=False)
        self.xpos_scale_base = config.xpos_scale_base
        self.register_buffer("xpos_table", empty.clone(), persistent=False)
        self._build_table(min(config.max_position_embeddings, initial_length))

    def reset(self, initial_length: int = 4096) -> None:
        """Recompute the frequencies and the table (the model's ``_init_weights`` calls this:
        ``from_pretrained`` creates non-persistent buffers without their values)."""
        device = self.inv_freq.device if not self.inv_freq.is_meta else None
        inv_freq, self.attention_scaling = inverse_frequencies(self.config)
        self.inv_freq = inv_freq.to(device)
        self._build_table(min(self.config.max_position_embeddings, initial_length))

    @property
    def cached_length(self) -> int:
        return self.cos_table.shape[0]

    def _build_table(self, length: int) -> None:
        if self.rope_type == "dynamic":
            inv_freq, _ = inverse_frequencies(self.config, seq_len=length)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.int64).float()
        angles = torch.outer(positions, self.inv_freq)  # (L, D/2): θ_i · m
        angles = torch.cat((angles, angles), dim=-1)  # (L, D): the same angle for both halves
        self.cos_table = angles.cos() * self.attention_scaling
        self.sin_table = angles.sin() * self.attention_scaling
        if self.xpos_scale_base is not None:  # (L, D): ζ_i^((m − origin)/B), both halves
            origin = self.config.max_position_embeddings // 2
            decay = xpos_decay(self.config.head_dim).to(positions.device)
            exponents = (positions - origin)[:, None] / self.xpos_scale_base
            scale = decay[None, :] ** exponents
            self.xpos_table = torch.cat((scale, scale), dim=-1)

    def _update_dynamic_table(self, needed: int) -> None:
        """Dynamic NTK, as transformers does it: stretch when a longer sequence arrives, and go
        back to the original frequencies once sequences fit the trained length again."""
        limit = self.config.max_position_embeddings
        if needed > self.cached_length:
            self._build_table(needed)
        elif needed < limit < self.cached_length:
            self._build_table(limit)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, ...]:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"position_ids must be integers, got dtype {position_ids.dtype}.")
        # One read of (min, max) per forward — the model calls this once for all its layers.
        low, high = (int(v) for v in torch.aminmax(position_ids))
        if low < 0:
            raise ValueError(
                f"position_ids contains {low}; positions start at 0 (left-padded batches use "
                "attention_mask.cumsum(-1) - 1 clamped at 0)."
            )
        if self.rope_type == "dynamic":
            self._update_dynamic_table(high + 1)
        elif high >= self.cached_length:
            self._build_table(max(high + 1, 2 * self.cached_length))
        cos = self.cos_table[position_ids]
        sin = self.sin_table[position_ids]
        if self.xpos_scale_base is None:
            return as_dtype(cos, dtype), as_dtype(sin, dtype)
        scale = self.xpos_table[position_ids]
        tables = (cos * scale, sin * scale, cos / scale, sin / scale)
        return tuple(as_dtype(t, dtype) for t in tables)

    def extra_repr(self) -> str:
        xpos = "" if self.xpos_scale_base is None else f", xpos_scale_base={self.xpos_scale_base}"
        return (
            f"rope_type={self.rope_type!r}, head_dim={self.config.head_dim}, "
            f"cached_length={self.cached_length}{xpos}"
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x₁, x₂] → [−x₂, x₁]`` on the last dimension: a quarter turn of every channel pair."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cos: torch.Tensor | None = None,
    key_sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries ``(B, Hq, T, D)`` and keys ``(B, Hkv, T, D)`` by ``cos, sin`` ``(B, T, D)``.

    Each pair ``(a, b)`` becomes ``(a·cos − b·sin, b·cos + a·sin)`` — a 2-D rotation. The head
    dimension is broadcast, so one table slice serves every head. ``key_cos, key_sin`` (XPos)
    give the keys their own tables; by default keys use the queries'.
    """
    if cos.shape[-1] != q.shape[-1] or cos.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"cos/sin of shape {tuple(cos.shape)} do not match queries {tuple(q.shape)}: expected "
            "(B, T, head_dim) for q of shape (B, H, T, head_dim). Compute them from the position "
            "ids of exactly these T tokens."
        )
    if key_cos is None:
        key_cos, key_sin = cos, sin
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    key_cos, key_sin = key_cos.unsqueeze(1), key_sin.unsqueeze(1)
    q_rotated = q * cos + rotate_half(q) * sin
    k_rotated = k * key_cos + rotate_half(k) * key_sin
    return q_rotated, k_rotated
