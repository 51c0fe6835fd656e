"""RMSNorm: parity with transformers' LlamaRMSNorm, dtype handling, errors."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from minifusion.norm import RMSNorm


def _pair(hidden: int, eps: float) -> tuple[RMSNorm, LlamaRMSNorm]:
    ours, reference = RMSNorm(hidden, eps=eps), LlamaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(hidden) * 0.5 + 1.0)
        reference.weight.copy_(ours.weight)
    return ours, reference


@pytest.mark.parametrize("hidden", [8, 96, 1536])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_matches_llama_rmsnorm_fp32(hidden, eps):
    torch.manual_seed(0)
    ours, reference = _pair(hidden, eps)
    x = torch.randn(3, 5, hidden) * 3.0
    assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_matches_llama_rmsnorm_bf16_exactly():
    torch.manual_seed(0)
    ours, reference = _pair(512, 1e-6)
    ours, reference = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    x = (torch.randn(4, 7, 512) * 10).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference(x))


def test_output_has_input_dtype_even_with_fp32_weight():
    norm = RMSNorm(16)
    x = torch.randn(2, 16).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


def test_fp32_statistic_beats_bf16_statistic():
    """The upcast matters: a bf16 mean of squares is measurably less accurate."""
    torch.manual_seed(0)
    x = torch.randn(64, 4096, dtype=torch.float64) * 4
    exact = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    xb = x.to(torch.bfloat16)
    ours = RMSNorm(4096, eps=0.0)(xb).double()
    # a bf16 running sum of squares, rounded after every addition
    running = torch.zeros(64, dtype=torch.bfloat16)
    for column in xb.pow(2).unbind(-1):
        running = running + column
    naive = (xb / (running / 4096).sqrt()[:, None].to(torch.bfloat16)).double()
    assert (ours - exact).abs().max() < (naive - exact).abs().max()


def test_is_scale_invariant():
    norm = RMSNorm(32, eps=0.0)
    x = torch.randn(4, 32)
    assert torch.allclose(norm(x), norm(7.5 * x), atol=1e-6)


def test_wrong_width_names_the_fix():
    with pytest.raises(ValueError, match="hidden_size=12"):
        RMSNorm(16)(torch.randn(2, 12))
