"""Mamba: chunked scan == sequential scan (outputs, last state, gradients; any length), parity
with transformers' MambaMixer, recurrent step == full forward, initialisation, dtypes, errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from minifusion.config import MiniFusionConfig
from minifusion.fused_scan import fused_scan_available
from minifusion.mamba import (
    MambaMixer,
    causal_conv1d,
    resolve_scan_impl,
    selective_scan,
    selective_scan_chunked,
    selective_scan_cuda,
    selective_scan_sequential,
)

CHUNK = 16


def scan_inputs(length, *, batch=2, d_inner=6, d_state=4, with_D=True, with_z=True,
                with_bias=True, step_scale=1.0, seed=0):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).float()

    inputs = {
        "u": randn(batch, d_inner, length),
        "delta": randn(batch, d_inner, length) * step_scale,
        "A": -torch.rand(d_inner, d_state, generator=generator) * 4 - 0.05,
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": randn(d_inner) if with_D else None,
        "z": randn(batch, d_inner, length) if with_z else None,
        "delta_bias": randn(d_inner) if with_bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run_scan(scan, inputs, **kwargs):
    """Output, last state, and the gradients of a random linear function of both."""
    y, last = scan(**inputs, delta_softplus=True, return_last_state=True, **kwargs)
    generator = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=generator)).sum()
    loss = loss + (last * torch.randn(last.shape, generator=generator)).sum()
    leaves = [v for v in inputs.values() if v is not None]
    return y, last, torch.autograd.grad(loss, leaves)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, what=""):
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual - expected).abs().max()
    assert error <= atol * scale + rtol * scale, (
        f"{what}: max |diff| {error:.2e} (scale {scale:.1f})"
    )


OPTIONAL = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("length", [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("with_D, with_z, with_bias", OPTIONAL)
def test_chunked_equals_sequential(length, with_D, with_z, with_bias):
    inputs = scan_inputs(length, with_D=with_D, with_z=with_z, with_bias=with_bias)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_sequential, inputs)
    y, last, grads = run_scan(selective_scan_chunked, inputs, chunk_size=CHUNK)
    assert y.shape == inputs["u"].shape and last.shape == (2, 6, 4)
    assert_close(y, y_ref, what="output")
    assert_close(last, last_ref, what="last state")
    names = [k for k, v in inputs.items() if v is not None]
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert_close(grad, grad_ref, what=f"d/d{name}")


@pytest.mark.parametrize("with_optional", [False, True])
def test_chunked_equals_sequential_long(with_optional):
    """L ≥ 1000 with the default chunk size (not a multiple of it)."""
    flags = dict(with_D=with_optional, with_z=with_optional, with_bias=with_optional)
    inputs = scan_inputs(1037, batch=1, d_inner=4, d_state=3, **flags)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_sequential, inputs)
    y, last, grads = run_scan(selective_scan_chunked, inputs, chunk_size=64)
    assert_close(y, y_ref, what="output")
    assert_close(last, last_ref, what="last state")
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, rtol=1e-4, what="gradient")


def test_chunked_stays_finite_with_strong_decay():
    """Δ·|A| up to ~400 per step: a scan that divided by cumulative decays would overflow."""
    inputs = scan_inputs(200, step_scale=20.0)
    with torch.no_grad():
        inputs["A"].mul_(5)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_sequential, inputs)
    y, last, grads = run_scan(selective_scan_chunked, inputs, chunk_size=64)
    assert all(torch.isfinite(t).all() for t in (y, last, *grads))
    assert_close(y, y_ref, what="output")
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, rtol=1e-4, what="gradient")


def test_scans_keep_the_input_dtype_and_run_in_fp32():
    inputs = {k: v.detach() for k, v in scan_inputs(20).items()}
    half = dict(inputs, u=inputs["u"].bfloat16(), delta=inputs["delta"].bfloat16())
    for scan in (selective_scan_sequential, selective_scan_chunked):
        y, last = scan(**half, delta_softplus=True, return_last_state=True)
        assert y.dtype == torch.bfloat16 and last.dtype == torch.float32


def test_scan_selection_and_errors():
    cpu = torch.device("cpu")
    assert resolve_scan_impl("auto", cpu) == ("fused" if fused_scan_available() else "chunked")
    assert resolve_scan_impl("sequential", cpu) == "sequential"
    with pytest.raises(ValueError, match="scan_impl"):
        resolve_scan_impl("fast", cpu)
    inputs = {k: v.detach() for k, v in scan_inputs(5).items()}
    with pytest.raises(RuntimeError, match="scan_impl='chunked'"):
        selective_scan_cuda(**inputs)
    bad = dict(inputs, B=inputs["B"][:, :, :3])
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**bad)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**inputs, chunk_size=0)


def test_causal_conv_sees_only_the_past():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 3, 10), torch.randn(3, 1, 4), torch.randn(3)
    reference = F.conv1d(x, weight, bias, padding=3, groups=3)[..., :10]
    torch.testing.assert_close(causal_conv1d(x, weight, bias), reference)
    changed = x.clone()
    changed[..., 6] += 1.0
    difference = (causal_conv1d(changed, weight, bias) - causal_conv1d(x, weight, bias)).abs()
    assert difference[..., :6].max() == 0 and difference[..., 6:].max() > 0


# ------------------------------------------------------------------------------- the mixer


def make_config(**overrides) -> MiniFusionConfig:
    settings = dict(hidden_size=32, num_attention_heads=4, mamba_d_state=8, mamba_chunk_size=8)
    settings.update(overrides)
    return MiniFusionConfig(**settings)


def perturbed_mixer(config: MiniFusionConfig, seed: int = 0) -> MambaMixer:
    """A mixer whose state-space and conv parameters are moved away from their initial values
    (the projections keep their random initialisation, so outputs stay of order one)."""
    torch.manual_seed(seed)
    mixer = MambaMixer(config)
    with torch.no_grad():
        for name, parameter in mixer.named_parameters():
            if not name.endswith("_proj.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return mixer


def hf_twin(mixer: MambaMixer, config: MiniFusionConfig) -> HFMambaMixer:
    reference = HFMambaMixer(
        MambaConfig(
            hidden_size=config.hidden_size,
            state_size=config.mamba_d_state,
            expand=config.mamba_expand,
            conv_kernel=config.mamba_d_conv,
            use_bias=config.mamba_proj_bias,
            use_conv_bias=config.mamba_conv_bias,
            time_step_rank=config.resolved_dt_rank,
            num_hidden_layers=1,
        ),
        0,
    )
    reference.load_state_dict(mixer.state_dict())
    return reference


@pytest.mark.parametrize("scan_impl", ["sequential", "chunked", "fused"])
@pytest.mark.parametrize("d_state, d_conv, expand", [(8, 4, 2), (16, 3, 1)])
def test_mixer_matches_transformers(scan_impl, d_state, d_conv, expand):
    config = make_config(mamba_scan_impl=scan_impl, mamba_d_state=d_state, mamba_d_conv=d_conv,
                         mamba_expand=expand)  # fmt: skip
    mixer = perturbed_mixer(config)
    reference = hf_twin(mixer, config)
    x = torch.randn(2, 29, 32, requires_grad=True)
    ours = mixer(x)
    theirs = reference(x)
    assert ours.abs().max() > 0.1  # not a comparison of near-zero outputs
    assert (ours - theirs).abs().max() <= 1e-5
    weights = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), x)
    assert (grad_ours - grad_theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("proj_bias", [False, True])
def test_mixer_matches_transformers_with_left_padding(proj_bias):
    # With an in_proj bias, a zeroed padding token still projects to the bias: the padding
    # must be zeroed at the conv's input, or the bias leaks into the first real tokens.
    config = make_config(mamba_proj_bias=proj_bias)
    mixer = perturbed_mixer(config)
    if proj_bias:
        with torch.no_grad():
            mixer.in_proj.bias.normal_(0, 1.0)
    reference = hf_twin(mixer, config)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        padded_state, alone_state = mixer.new_state(2), mixer.new_state(1)
        ours = mixer(x, padded_state, attention_mask=mask)
        if not proj_bias:  # transformers' Mamba masks before in_proj, so it leaks the bias too
            torch.testing.assert_close(ours, reference(x, attention_mask=mask), atol=1e-5, rtol=0)
        # the padded row's real tokens (and the state they leave) are those of the unpadded row
        alone = mixer(x[:1, 5:], alone_state)
    torch.testing.assert_close(ours[:1, 5:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_state.conv[:1], alone_state.conv, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded_state.ssm[:1], alone_state.ssm, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefill", [0, 1, 2, 3, 4, 9])
def test_step_after_prefill_equals_full_forward(prefill):
    config = make_config(mamba_d_conv=4)
    mixer = perturbed_mixer(config)
    x = torch.randn(2, 14, 32)
    with torch.no_grad():
        full = mixer(x)
        state = mixer.new_state(2)
        outputs = [mixer(x[:, :prefill], state)] if prefill else []
        memory = state.memory_bytes
        for t in range(prefill, x.shape[1]):
            outputs.append(mixer.step(x[:, t], state)[:, None])
            assert state.memory_bytes == memory  # constant memory per generated token
    assert state.seen == x.shape[1]
    torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=0)


def test_forward_with_a_filled_state_continues_the_sequence():
    mixer = perturbed_mixer(make_config())
    x = torch.randn(1, 11, 32)
    with torch.no_grad():
        full = mixer(x)
        state = mixer.new_state(1)
        pieces = [mixer(x[:, :4], state), mixer(x[:, 4:9], state), mixer(x[:, 9:], state)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_initialisation_follows_mamba_ssm():
    config = make_config(hidden_size=64, mamba_d_state=16)
    mixer = MambaMixer(config)
    n = config.mamba_d_state
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, n + 1)).expand(128, n))
    assert torch.all(mixer.D == 1)
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= config.mamba_dt_min * 0.999 and dt.max() <= config.mamba_dt_max * 1.001
    # log-uniform: the median of log Δ sits near the middle of [log dt_min, log dt_max]
    middle = (math.log(config.mamba_dt_min) + math.log(config.mamba_dt_max)) / 2
    assert abs(dt.log().median().item() - middle) < 0.5
    bound = config.resolved_dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    assert mixer.conv1d.bias is not None and mixer.in_proj.bias is None
    assert mixer.out_proj.bias is None and mixer.x_proj.bias is None
    flagged = {
        name for name, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)
    }
    assert flagged == {"A_log", "D", "dt_proj.bias"}
    count = sum(p.numel() for p in mixer.parameters())
    expected = sum(v for k, v in config.parameter_breakdown().items() if k.startswith("mamba.")) \
        // config.num_hidden_layers  # fmt: skip
    assert count == expected


def test_ssm_parameters_stay_fp32_and_scan_runs_in_fp32(monkeypatch):
    mixer = perturbed_mixer(make_config()).to(torch.bfloat16)
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    for name in MambaMixer.FP32_PARAMETERS:
        assert mixer.get_parameter(name).dtype == torch.float32, name

    import minifusion.mamba as mamba

    seen = []
    original = mamba.selective_scan

    def spy(*args, **kwargs):
        seen.extend(t.dtype for t in args if isinstance(t, torch.Tensor))
        return original(*args, **kwargs)

    monkeypatch.setattr(mamba, "selective_scan", spy)
    fp32 = perturbed_mixer(make_config())
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(x)
    assert seen and all(dtype == torch.float32 for dtype in seen)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32(x), atol=0.05, rtol=0.05)


@pytest.mark.gpu
def test_cuda_kernel_matches_chunked_scan():  # pragma: no cover - needs CUDA and mamba-ssm
    pytest.importorskip("mamba_ssm")
    inputs = {k: v.detach().cuda() if v is not None else None
              for k, v in scan_inputs(300, d_inner=64, d_state=16).items()}  # fmt: skip
    for v in inputs.values():
        if v is not None:
            v.requires_grad_()
    y_ref, last_ref, grads_ref = run_scan(selective_scan_chunked, inputs)
    y, last, grads = run_scan(selective_scan_cuda, inputs)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert_close(last, last_ref, rtol=1e-4, atol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, rtol=1e-3, atol=1e-3)
