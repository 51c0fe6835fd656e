"""The compiled CPU scan (minifusion/csrc/selective_scan.cpp) against the sequential scan.

Outputs, last state and the gradient of every input equal the didactic loop's at lengths around
the kernel's 32-position segments and the chunked scan's chunks, with and without D, z and
delta_bias; float64 ``gradcheck``; bf16 inputs; bitwise the same results for 1 and 2 threads;
the one-token step; ``auto`` picking it; and the fallback (one warning) where it cannot build.
"""

import sys
import warnings

import pytest
import torch

from minifusion import extensions
from minifusion.fused_scan import (
    fused_conv_step,
    fused_scan_available,
    fused_state_step,
    selective_scan_fused,
)
from minifusion.mamba import (
    resolve_scan_impl,
    selective_scan_chunked,
    selective_scan_sequential,
    selective_state_update,
)

from .test_mamba import OPTIONAL, assert_close, run_scan, scan_inputs

pytestmark = pytest.mark.skipif(
    not fused_scan_available(), reason="the compiled scan could not be built on this machine"
)
SEGMENT = 32  # positions between the states the kernel's forward pass saves


@pytest.mark.parametrize("length", [1, 7, SEGMENT - 1, SEGMENT, SEGMENT + 1, 63, 64, 65])
@pytest.mark.parametrize("with_D, with_z, with_bias", OPTIONAL)
def test_fused_equals_sequential(length, with_D, with_z, with_bias):
    inputs = scan_inputs(length, with_D=with_D, with_z=with_z, with_bias=with_bias)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_sequential, inputs)
    y, last, grads = run_scan(selective_scan_fused, inputs)
    assert y.shape == inputs["u"].shape and last.shape == (2, 6, 4)
    assert_close(y, y_ref, what="output")
    assert_close(last, last_ref, what="last state")
    names = [k for k, v in inputs.items() if v is not None]
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert_close(grad, grad_ref, what=f"d/d{name}")


@pytest.mark.parametrize("with_optional", [False, True])
@pytest.mark.parametrize(
    "length, d_inner",
    # 70 channels: one full block of 64 and a partial one; 300: the wide blocks (128 channels)
    # that AVX-512 builds take from 256 channels on — two full and a partial one.
    [(1037, 70), (101, 300)],
)
def test_fused_equals_sequential_long_and_wide(with_optional, length, d_inner):
    """A length that is not a multiple of the segment and channels that end in a partial
    block, whose missing lanes must neither leak into B/C's gradients nor be written."""
    flags = dict(with_D=with_optional, with_z=with_optional, with_bias=with_optional)
    inputs = scan_inputs(length, batch=1, d_inner=d_inner, d_state=3, **flags)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_sequential, inputs)
    y, last, grads = run_scan(selective_scan_fused, inputs)
    assert_close(y, y_ref, what="output")
    assert_close(last, last_ref, what="last state")
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, rtol=1e-4, what="gradient")


def test_fused_stays_finite_with_strong_decay():
    inputs = scan_inputs(200, step_scale=20.0)
    with torch.no_grad():
        inputs["A"].mul_(5)
    y_ref, _, grads_ref = run_scan(selective_scan_sequential, inputs)
    y, _, grads = run_scan(selective_scan_fused, inputs)
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    assert_close(y, y_ref, what="output")
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, rtol=1e-4, what="gradient")


def test_fused_equals_chunked_without_softplus():
    """delta used as given (positive here, as a step size must be)."""
    inputs = {k: v.detach() for k, v in scan_inputs(50).items()}
    inputs["delta"], inputs["delta_bias"] = inputs["delta"].abs() * 0.3, None
    y_ref, last_ref = selective_scan_chunked(**inputs, return_last_state=True)
    y, last = selective_scan_fused(**inputs, return_last_state=True)
    assert_close(y, y_ref, what="output")
    assert_close(last, last_ref, what="last state")


@pytest.mark.parametrize("with_optional", [False, True])
def test_fused_gradcheck_float64(with_optional):
    """In float64 the kernel computes in float64, so finite differences can check it."""
    flags = dict(with_D=with_optional, with_z=with_optional, with_bias=with_optional)
    inputs = scan_inputs(37, batch=2, d_inner=3, d_state=2, **flags)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = tuple(inputs[k].detach().double().requires_grad_() for k in names)

    def scan(*tensors):
        return selective_scan_fused(
            **dict(zip(names, tensors)), delta_softplus=True, return_last_state=True
        )

    assert torch.autograd.gradcheck(scan, leaves)


def test_fused_accepts_bf16_and_keeps_its_dtype():
    inputs = {k: v.detach() for k, v in scan_inputs(40).items()}
    half = {k: v.bfloat16() if k in ("u", "delta", "z", "B", "C") else v for k, v in inputs.items()}
    y, last = selective_scan_fused(**half, delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    y_ref, _ = selective_scan_sequential(**half, delta_softplus=True, return_last_state=True)
    assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2, what="bf16 output")


@pytest.mark.parametrize("d_inner", [150, 300])  # blocks of 64; of 128 with AVX-512
def test_fused_gives_the_same_bits_for_any_number_of_threads(d_inner):
    """Gradients summed over channels or the batch are added in a fixed order."""
    inputs = scan_inputs(300, batch=3, d_inner=d_inner, d_state=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_scan(selective_scan_fused, inputs)
        torch.set_num_threads(2)
        two = run_scan(selective_scan_fused, inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip((one[0], one[1], *one[2]), (two[0], two[1], *two[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_optional", [False, True])
def test_fused_step_equals_the_pytorch_step_and_the_scan(with_optional):
    flags = dict(with_D=with_optional, with_z=with_optional, with_bias=with_optional)
    inputs = {k: v if v is None else v.detach() for k, v in scan_inputs(9, **flags).items()}
    y_scan, last_scan = selective_scan_sequential(**inputs, delta_softplus=True,
                                                  return_last_state=True)  # fmt: skip
    state_fused = torch.zeros(2, 6, 4)
    state_torch = torch.zeros(2, 6, 4)
    for t in range(9):
        step = {k: inputs[k][..., t] for k in ("u", "delta", "B", "C")}
        z = inputs["z"][..., t] if inputs["z"] is not None else None
        args = (step["u"], step["delta"], inputs["A"], step["B"], step["C"], inputs["D"], z,
                inputs["delta_bias"], True)  # fmt: skip
        y_fused = fused_state_step(state_fused, *args)
        y_torch = selective_state_update(state_torch, *args, impl="chunked")
        assert_close(y_fused, y_torch, what=f"step {t}")
        assert_close(y_fused, y_scan[..., t], what=f"step {t} vs scan")
    assert_close(state_fused, last_scan, what="state")


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_conv_step_equals_the_causal_conv(with_bias):
    """Step by step, the compiled conv window gives the causal depthwise conv + SiLU of the
    whole sequence and leaves the last d_conv inputs in the window."""
    torch.manual_seed(0)
    batch, channels, kernel, length = 2, 5, 4, 9
    x = torch.randn(batch, channels, length)
    weight = torch.randn(channels, kernel)
    bias = torch.randn(channels) if with_bias else None
    padded = torch.nn.functional.pad(x, (kernel - 1, 0))
    expected = torch.nn.functional.silu(
        torch.nn.functional.conv1d(padded, weight[:, None], bias, groups=channels)
    )
    window = torch.zeros(batch, channels, kernel)
    for t in range(length):
        y = fused_conv_step(window, x[..., t], weight, bias)
        assert_close(y, expected[..., t], what=f"position {t}")
    torch.testing.assert_close(window, x[..., -kernel:], rtol=0, atol=0)


def test_auto_picks_the_kernel_on_cpu():
    assert resolve_scan_impl("auto", torch.device("cpu")) == "fused"


@pytest.fixture
def fresh_kernel_cache():
    extensions.scan_kernel.cache_clear()
    yield
    extensions.scan_kernel.cache_clear()


def test_without_a_compiler_auto_falls_back_with_one_warning(fresh_kernel_cache, monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built.*command not found.*make extensions"):
        assert resolve_scan_impl("auto", torch.device("cpu")) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no second warning
        assert resolve_scan_impl("auto", torch.device("cpu")) == "chunked"
    inputs = {k: v.detach() for k, v in scan_inputs(5).items()}
    with pytest.raises(RuntimeError, match="scan_impl='auto' or 'chunked'"):
        selective_scan_fused(**inputs)


def test_the_kernel_can_be_switched_off(fresh_kernel_cache, monkeypatch):
    monkeypatch.setenv(extensions.DISABLE_VARIABLE, "0")
    assert resolve_scan_impl("auto", torch.device("cpu")) == "chunked"


def test_the_environment_report_says_where_the_kernel_stands_without_building_it(
    tmp_path, monkeypatch
):
    from minifusion.utils import environment_report

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", sys.executable)  # a program that exists: "a compiler is there"
    folder = tmp_path / extensions.SCAN_EXTENSION
    folder.mkdir()
    (folder / "build.ninja").write_text("")  # a build that never finished is not a build
    assert extensions.scan_kernel_status().startswith("not built yet")
    (folder / f"{extensions.SCAN_EXTENSION}.so").write_bytes(b"")
    assert extensions.scan_kernel_status().startswith("built")
    report = environment_report()
    assert report.cpu_scan_kernel.startswith("built") and "CPU scan kernel" in str(report)

    # without $TORCH_EXTENSIONS_DIR, PyTorch builds one level deeper (a python/device tag)
    default_root = tmp_path / "default"
    tagged = default_root / "py311_cpu" / extensions.SCAN_EXTENSION
    tagged.mkdir(parents=True)
    (tagged / f"{extensions.SCAN_EXTENSION}.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(default_root))
    assert extensions.scan_kernel_status().startswith("built")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in extensions.scan_kernel_status()
    monkeypatch.setenv(extensions.DISABLE_VARIABLE, "0")
    assert extensions.scan_kernel_status().startswith(f"off ({extensions.DISABLE_VARIABLE}=0)")


def test_the_build_flags_name_the_cpus_features(tmp_path, monkeypatch):
    """``-march=native`` reads the same everywhere: a build cached on a CPU with AVX-512 would
    load on one without it and die of an illegal instruction. The flags carry the feature list,
    so PyTorch (which rebuilds when the flags change) builds again on a different kind of CPU."""
    def cpuinfo(flags: str) -> str:
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"  # a new file per call
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
        return str(path)

    avx2, avx512 = "fpu sse2 avx avx2 fma", "fpu sse2 avx avx2 fma avx512f avx512bw"
    assert extensions.cpu_features_tag(cpuinfo(avx2)) != extensions.cpu_features_tag(cpuinfo(avx512))
    # the order of the features does not matter, only which ones there are
    assert extensions.cpu_features_tag(cpuinfo(avx2)) == extensions.cpu_features_tag(
        cpuinfo("avx2 fma fpu avx sse2"))
    monkeypatch.setattr(extensions.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(extensions, "cpu_features_tag", lambda: "0123456789ab")
    flags = extensions._compiler_flags()
    assert "-march=native" in flags and "-DMINIFUSION_BUILD_CPU=0123456789ab" in flags
