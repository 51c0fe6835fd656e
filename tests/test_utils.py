import inspect
import random

import numpy as np
import pytest
import torch

from minifusion.utils import (
    environment_report,
    format_count,
    pick_device,
    seed_everything,
    source_code,
)


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


def test_within_prints_the_bound_it_checked():
    from minifusion.utils import within

    assert within(3e-8, 1e-6) == "≤ 1e-06" and within(torch.tensor(0.0), 1e-5) == "≤ 1e-05"
    with pytest.raises(AssertionError, match="exceeds the bound 1e-06"):
        within(2e-6, 1e-6)
    with pytest.raises(AssertionError):
        within(float("nan"), 1.0)


def test_lock_report_compares_locked_and_installed_versions(tmp_path):
    from minifusion.utils import lock_report, locked_versions

    lock = tmp_path / "lock.txt"
    lock.write_text("torch==2.13.0\n    # via minifusion\nnumpy==0.0.1\n", encoding="utf-8")
    assert locked_versions(lock) == {"torch": "2.13.0", "numpy": "0.0.1"}
    lines = lock_report(["torch", "numpy", "not-a-package"], lock).splitlines()
    assert lines[1].split()[:2] == ["torch", "2.13.0"] and lines[1].endswith("✓")  # +cpu = same
    assert lines[2].endswith("differs") and "not installed" in lines[3]


def test_show_widget_keeps_the_widget_and_replaces_its_text_fallback(monkeypatch):
    import IPython.display
    import ipywidgets

    from minifusion.utils import WIDGET_NOTE, show_widget

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    box = ipywidgets.VBox([ipywidgets.IntSlider(value=3)])
    show_widget(box)
    ((bundle, raw),) = shown
    assert raw and bundle["text/plain"] == WIDGET_NOTE
    view = bundle["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == box.model_id  # the live widget is still what JupyterLab renders
    with pytest.raises(TypeError, match="no view"):
        show_widget(ipywidgets.Widget())  # the base class: state only, no view


def _formatted_by_hand(a, b):
    total = (a +
             b)  # fmt: skip
    return total  # the formatter's marker only counts at the end of a line: # fmt: skip here


def test_source_code_drops_the_formatter_markers_and_nothing_else():
    raw, shown = inspect.getsource(_formatted_by_hand), source_code(_formatted_by_hand)
    assert "             b)  # fmt: skip\n" in raw
    assert shown == raw.replace("b)  # fmt: skip\n", "b)\n")  # the hand alignment stays
    assert "# fmt: skip here" in shown


class _Documented:
    @staticmethod
    def method(x):
        '''Add one.

        Written with single quotes, to show the docstring is found by parsing, not by '"""'.
        '''

        y = x + 1  # "step one"
        z = y * 2
        return z


def test_source_code_can_drop_the_docstring_of_an_indented_decorated_method():
    shown = source_code(_Documented.method, docstring=False)
    expected = (
        "    @staticmethod\n"
        "    def method(x):\n"
        '        y = x + 1  # "step one"\n'
        "        z = y * 2\n"
        "        return z\n"
    )
    assert shown == expected
    assert source_code(_formatted_by_hand, docstring=False) == source_code(_formatted_by_hand)


def test_source_code_excerpt_keeps_the_lines_between_two_markers():
    shown = source_code(_Documented.method, docstring=False, excerpt=("y = x", "z = y"))
    assert shown == '        …\n        y = x + 1  # "step one"\n        z = y * 2\n        …\n'
    with pytest.raises(ValueError, match="no line of _Documented.method's source contains 'w = '"):
        source_code(_Documented.method, excerpt=("y = x", "w = "))
