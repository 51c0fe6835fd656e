import random

import numpy as np
import pytest
import torch

from minifusion.utils import environment_report, format_count, pick_device, seed_everything


def _draw() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.randn(5)


def test_same_seed_same_draws_across_all_generators():
    seed_everything(123)
    first = _draw()
    seed_everything(123)
    second = _draw()
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_different_seed_different_draws():
    seed_everything(1)
    a = _draw()
    seed_everything(2)
    b = _draw()
    assert a[0] != b[0] and not torch.equal(a[2], b[2])


def test_deterministic_flag_toggles_torch_setting():
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("bad", [-1, 1.5, "7"])
def test_bad_seed_is_rejected(bad):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(bad)


def test_pick_device_cpu_and_forced():
    device = pick_device()
    assert device.type in ("cuda", "mps", "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_pick_device_unavailable_cuda_raises_clearly():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_environment_report_lists_what_chapter_00_shows():
    report = environment_report()
    assert set(report.packages) >= {"torch", "transformers", "datasets", "deepspeed"}
    assert report.packages["torch"] == torch.__version__.split("+")[0] or report.packages["torch"]
    text = str(report)
    for label in (
        "python",
        "torch",
        "transformers",
        "datasets",
        "deepspeed",
        "CUDA",
        "mamba-ssm kernels",
    ):
        assert label in text
    if not torch.cuda.is_available():
        assert report.mamba_kernels is False  # mamba-ssm cannot import without CUDA


def test_format_count():
    assert format_count(1234) == "1.23K"
    assert format_count(1_550_000_000) == "1.55B"
    assert format_count(12) == "12"
