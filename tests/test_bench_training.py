"""bench/training.py: MFU arithmetic on known numbers, and the benchmark at tiny sizes."""

import pytest

from bench.training import (
    MatmulPeak,
    TrainingMeasurement,
    format_table,
    main,
    measure_matmul_peak,
    mfu,
    run,
)


def test_mfu_arithmetic_on_known_numbers():
    # 1 MFLOP forward per token, 1,000 tokens/s: training does 3 GFLOP/s; of a 10 GFLOP/s peak, 30 %.
    assert mfu(1e6, 1000.0, 1e10) == pytest.approx(0.3)
    m = TrainingMeasurement(
        preset="p", parameters=10, batch_size=2, seq_len=8, precision="float32", steps=1,
        seconds_per_step=0.5, flops_per_token=1e6,
    )  # fmt: skip
    assert m.tokens_per_s == pytest.approx(32.0)  # 2 × 8 tokens every 0.5 s
    assert m.model_flops_per_s == pytest.approx(3 * 1e6 * 32)
    peak = MatmulPeak(size=64, dtype="float32", seconds=1e-3, flops_per_s=9.6e7)
    row = format_table(peak, [m]).splitlines()[-1]
    assert row.startswith("| p |") and row.endswith("| 100.0 % |")  # 9.6e7 of 9.6e7


def test_matmul_peak_is_the_best_size():
    peak = measure_matmul_peak((32, 64), repeats=1)
    assert peak.size in (32, 64) and peak.dtype == "float32"
    assert peak.flops_per_s == pytest.approx(2 * peak.size**3 / peak.seconds)


def test_training_run_and_command_line(capsys):
    peak, results = run({"tiny": (1, 16)}, matmul_sizes=(32,), steps=1, warmup_steps=1)
    (m,) = results
    assert (m.preset, m.batch_size, m.seq_len, m.precision) == ("tiny", 1, 16, "float32")
    assert m.seconds_per_step > 0 and m.flops_per_token > 0 and m.parameters > 0
    assert "dense matmul peak, n = 32" in format_table(peak, results)
    main(["--presets", "tiny", "--batch-size", "1", "--seq-len", "16", "--steps", "1",
          "--warmup-steps", "0", "--matmul-sizes", "32"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| tiny |" in out and "MFU" in out
