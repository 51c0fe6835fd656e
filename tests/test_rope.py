"""RoPE: parity with transformers' Llama rotary embedding, the relative-position property,
one shared growable table, and scaling types."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from minifusion.config import MiniFusionConfig
from minifusion.rope import RotaryEmbedding, apply_rotary, inverse_frequencies

HEAD_DIMS = [64, 24]  # 24: not a power of two

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-500k": {"rope_type": "default", "rope_theta": 500000.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "yarn-tuned": {
        "rope_type": "yarn",
        "rope_theta": 50000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "truncate": False,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def _configs(head_dim: int, rope: dict, max_positions: int = 1024):
    heads = 4
    ours = MiniFusionConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope),
    )
    reference = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope),
    )
    return ours, reference


def _angle_tolerance(max_position: int) -> float:
    """cos/sin agree to a few roundings of the largest angle, ``position · inv_freq`` in fp32.

    An angle of ``p`` radians carries a rounding error of ``p · 2⁻²⁴``; the two implementations
    form it in another order (and each CPU's kernels in another order again), so cos and sin can
    differ by a few such units at the largest positions — and by O(1) for a real bug.
    """
    return 4 * max_position * 2.0**-24


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_cos_sin_match_llama(head_dim, case):
    ours_config, reference_config = _configs(head_dim, ROPE_CASES[case])
    rope, reference = RotaryEmbedding(ours_config), LlamaRotaryEmbedding(reference_config)
    # batches with different offsets, as in cached decoding; within max_position_embeddings
    position_ids = torch.stack([torch.arange(0, 700), torch.arange(300, 1000)])
    cos, sin = rope(position_ids)
    ref_cos, ref_sin = reference(torch.zeros(1, dtype=torch.float32), position_ids)
    assert cos.shape == (2, 700, head_dim)
    assert (cos - ref_cos).abs().max() <= _angle_tolerance(1000)
    assert (sin - ref_sin).abs().max() <= _angle_tolerance(1000)


def test_dynamic_ntk_beyond_max_length_matches_llama():
    ours_config, reference_config = _configs(32, ROPE_CASES["dynamic"], max_positions=256)
    rope, reference = RotaryEmbedding(ours_config), LlamaRotaryEmbedding(reference_config)
    position_ids = torch.arange(600)[None]  # longer than max_position_embeddings: base grows
    cos, sin = rope(position_ids)
    ref_cos, ref_sin = reference(torch.zeros(1), position_ids)
    assert (cos - ref_cos).abs().max() <= _angle_tolerance(600)
    assert (sin - ref_sin).abs().max() <= _angle_tolerance(600)
    default_cos, _ = RotaryEmbedding(_configs(32, ROPE_CASES["default"], 256)[0])(position_ids)
    assert not torch.allclose(cos, default_cos)  # the scaling really did something
    # a short sequence afterwards goes back to the original frequencies, in both
    short = torch.arange(100)[None]
    cos, _ = rope(short)
    ref_cos, _ = reference(torch.zeros(1), short)
    assert (cos - ref_cos).abs().max() <= 1e-5
    assert torch.equal(cos, default_cos[:, :100])


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", ["default", "yarn"])
def test_apply_rotary_matches_llama(head_dim, case):
    torch.manual_seed(0)
    config, _ = _configs(head_dim, ROPE_CASES[case])
    cos, sin = RotaryEmbedding(config)(torch.arange(5, 45)[None].expand(2, -1))
    q, k = torch.randn(2, 4, 40, head_dim), torch.randn(2, 2, 40, head_dim)
    ours_q, ours_k = apply_rotary(q, k, cos, sin)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert (ours_q - ref_q).abs().max() <= 1e-5
    assert (ours_k - ref_k).abs().max() <= 1e-5


def test_rotation_keeps_vector_lengths():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=2)
    cos, sin = RotaryEmbedding(config)(torch.arange(100)[None])
    q = torch.randn(1, 2, 100, 32)
    rotated, _ = apply_rotary(q, q, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def test_dot_product_depends_only_on_offset():
    """⟨RoPE(q, m), RoPE(k, n)⟩ is the same for every (m, n) with the same m − n."""
    torch.manual_seed(0)
    config = MiniFusionConfig(hidden_size=96, num_attention_heads=2)  # head_dim 48
    rope = RotaryEmbedding(config)
    q, k = torch.randn(48, dtype=torch.float64), torch.randn(48, dtype=torch.float64)

    def rotated(vector: torch.Tensor, position: int) -> torch.Tensor:
        cos, sin = rope(torch.tensor([[position]]), dtype=torch.float64)
        out, _ = apply_rotary(vector.view(1, 1, 1, -1), vector.view(1, 1, 1, -1), cos, sin)
        return out.flatten()

    for offset in (0, 1, 7, 100):
        scores = torch.stack(
            [rotated(q, n + offset) @ rotated(k, n) for n in (0, 3, 50, 400, 1500)]
        )
        assert (scores - scores[0]).abs().max() < 1e-4, (offset, scores)
    # …and it does change with the offset (positions are really encoded)
    assert abs(float(rotated(q, 5) @ rotated(k, 0) - rotated(q, 6) @ rotated(k, 0))) > 1e-3


def test_one_table_grows_on_demand_and_keeps_values():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=128)
    rope = RotaryEmbedding(config)
    assert rope.cached_length == 128
    first_cos, _ = rope(torch.arange(10)[None])
    cos, sin = rope(torch.tensor([[1000]]))  # beyond the table: it grows
    assert rope.cached_length >= 1001
    again_cos, _ = rope(torch.arange(10)[None])
    assert torch.equal(first_cos, again_cos)
    assert cos.shape == (1, 1, 32)


def test_cached_decoding_offsets_equal_full_positions():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=2)
    rope = RotaryEmbedding(config)
    full_cos, full_sin = rope(torch.arange(20)[None])
    step_cos, step_sin = rope(torch.tensor([[19]]))  # the 20th token, decoded alone
    assert torch.equal(step_cos[0, 0], full_cos[0, 19])
    assert torch.equal(step_sin[0, 0], full_sin[0, 19])


def test_table_follows_module_device_and_returns_requested_dtype():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=2)
    rope = RotaryEmbedding(config).to(torch.device("cpu"))
    assert "cos_table" not in rope.state_dict()  # rebuilt, never saved in checkpoints
    cos, sin = rope(torch.arange(4), dtype=torch.bfloat16)  # (T,) is a batch of one
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 4, 32)


def test_yarn_keeps_fast_pairs_and_stretches_slow_ones():
    config, _ = _configs(64, ROPE_CASES["yarn"])
    base_config, _ = _configs(64, ROPE_CASES["default"])
    yarn, temperature = inverse_frequencies(config)
    plain, _ = inverse_frequencies(base_config)
    assert torch.allclose(yarn[0], plain[0])  # fastest pair untouched
    assert torch.allclose(yarn[-1], plain[-1] / 4.0)  # slowest pair interpolated by the factor
    assert temperature == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)


def test_bad_inputs_have_clear_errors():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=2)
    rope = RotaryEmbedding(config)
    with pytest.raises(ValueError, match="positions start at 0"):
        rope(torch.tensor([[-1, 0, 1]]))
    with pytest.raises(TypeError, match="integers"):
        rope(torch.zeros(1, 3))
    cos, sin = rope(torch.arange(5)[None])
    with pytest.raises(ValueError, match="do not match"):
        apply_rotary(torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32), cos, sin)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "not supported"),
        ({"hidden_size": 60, "num_attention_heads": 4}, "odd"),  # head_dim 15
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                 "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
    ],
)  # fmt: skip
def test_config_rejects_unsupported_rope(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiniFusionConfig(**kwargs)


# ------------------------------------------------------------------------------------- XPos ---
def _complex_pairs(vector: torch.Tensor) -> torch.Tensor:
    """Half-rotation layout: pair i is (channel i, channel i + D/2) → a complex number."""
    first, second = vector.double().chunk(2)
    return torch.complex(first, second)


@pytest.mark.parametrize("head_dim, scale_base", [(16, 512), (8, 16)])
def test_xpos_scores_follow_the_formula_of_sun_et_al(head_dim, scale_base):
    """score(n, m) = Σ_i Re[q_i · conj(k_i) · e^{i(n−m)θ_i}] · ζ_i^((n−m)/B),
    ζ_i = (2i/d + 0.4)/1.4 (Sun et al., 2022, "A Length-Extrapolatable Transformer")."""
    torch.manual_seed(0)
    config = MiniFusionConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                              max_position_embeddings=256, xpos_scale_base=scale_base)  # fmt: skip
    rope = RotaryEmbedding(config)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    zeta = (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim + 0.4) / 1.4
    for n, m in [(0, 0), (5, 2), (40, 0), (200, 190), (255, 3)]:
        positions = torch.tensor([[n, m]])
        cos_q, sin_q, cos_k, sin_k = rope(positions)
        q_rot, _ = apply_rotary(q.view(1, 1, 1, -1), q.view(1, 1, 1, -1), cos_q[:, :1], sin_q[:, :1])
        _, k_rot = apply_rotary(k.view(1, 1, 1, -1), k.view(1, 1, 1, -1), cos_k[:, 1:], sin_k[:, 1:])
        score = float(q_rot.flatten() @ k_rot.flatten())
        offset = n - m
        terms = _complex_pairs(q) * _complex_pairs(k).conj() * torch.exp(1j * offset * theta)
        expected = float((terms.real * zeta ** (offset / scale_base)).sum())
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-5), (n, m)


def test_xpos_decays_fast_pairs_first_and_is_off_by_default():
    config = MiniFusionConfig(hidden_size=64, num_attention_heads=2, xpos_scale_base=8,
                              max_position_embeddings=128)  # fmt: skip
    rope = RotaryEmbedding(config)
    assert len(RotaryEmbedding(MiniFusionConfig(hidden_size=64, num_attention_heads=2))(
        torch.arange(3)[None])) == 2  # fmt: skip
    cos_q, sin_q, cos_k, sin_k = rope(torch.tensor([[64, 0]]))
    # the length of each pair's (cos, sin) is its scale; the query's times the key's: ζ_i^(64/8)
    decay = (cos_q[0, 0].hypot(sin_q[0, 0]) * cos_k[0, 1].hypot(sin_k[0, 1]))[:16]
    zeta = (torch.arange(0, 32, 2) / 32 + 0.4) / 1.4
    torch.testing.assert_close(decay, zeta**8, rtol=1e-4, atol=1e-7)
    assert decay[0] < decay[8] < decay[15] < 1  # the fastest-turning pairs fade the most
