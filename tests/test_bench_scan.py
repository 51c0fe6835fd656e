"""bench/scan.py runs at tiny sizes and prints one row per length with ratios to the loop."""

from types import SimpleNamespace

import pytest
import torch

from bench import timing
from bench.scan import format_table, isolated_peak_bytes, main, run
from minifusion.fused_scan import fused_scan_available


def test_table_marks_lengths_beyond_the_reference_limit():
    results = run((8, 24), d_inner=4, d_state=2, batch_size=1, repeats=1, min_seconds=0.0,
                  reference_max_len=8, isolate_memory=False)  # fmt: skip
    kernel = {("fused", 8), ("fused", 24)} if fused_scan_available() else set()
    assert {(m.scan, m.seq_len) for m in results} == {
        ("sequential", 8), ("chunked", 8), ("transformers", 8), ("sequential", 24),
        ("chunked", 24),
    } | kernel  # fmt: skip
    assert all(m.seconds > 0 for m in results)
    rows = format_table(results).splitlines()
    assert rows[0].startswith("| L | sequential ms | chunked ms | transformers ms |")
    assert rows[2].startswith("| 8 |") and "—" not in rows[2]
    assert rows[3].startswith("| 24 |") and rows[3].count("—") == 4


@pytest.mark.slow
def test_isolated_memory_and_command_line(tmp_path, capsys):
    peak = isolated_peak_bytes("chunked", 64, 1, 256, 16)
    assert peak is None or peak >= 0
    saved = tmp_path / "scan.md"
    main(["--seq-lens", "8", "--d-inner", "4", "--d-state", "2", "--repeats", "1",
          "--min-seconds", "0", "--reference-max-len", "0", "--save", str(saved)])  # fmt: skip
    assert "sequential/chunked time" in capsys.readouterr().out
    assert "| 8 |" in saved.read_text()


class _FakeClock:
    """A clock that only moves when the timed step runs: each run takes 50 ms."""

    def __init__(self):
        self.now, self.runs = 0.0, 0

    def perf_counter(self):
        return self.now

    def step(self):
        self.runs += 1
        self.now += 0.05


@pytest.mark.parametrize(
    ("min_total", "max_repeats", "timed_runs"),
    [(0.0, 100, 3), (1.0, 100, 20), (1.0, 10, 10), (0.1, 100, 3)],
)
def test_median_seconds_runs_a_fast_step_until_the_minimum_time(
    monkeypatch, min_total, max_repeats, timed_runs
):
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    seconds = timing.median_seconds(clock.step, 3, torch.device("cpu"),
                                    min_total_seconds=min_total, max_repeats=max_repeats)  # fmt: skip
    assert seconds == pytest.approx(0.05)
    assert clock.runs == 1 + timed_runs  # one warm-up run, then the timed ones
