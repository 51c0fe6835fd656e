"""bench.loss: both losses measured side by side; the chunked one needs a fraction of the memory."""

from __future__ import annotations

import pytest
import torch

from bench import loss


def test_both_losses_compute_the_same_gradients_in_the_benchmark():
    steps = loss.head_steps(tokens=64, hidden=8, vocab=32, chunk_rows=16, device=torch.device("cpu"))
    assert list(steps) == list(loss.VARIANTS)
    for step in steps.values():
        assert step() is None  # forward + backward, gradients cleared for the next call


def test_a_small_run_fills_the_tables_and_the_chunked_loss_saves_memory():
    # 2,048 tokens × 4,096 logits: 32 MiB of fp32 logits, which the chunked loss never holds
    data = loss.run(shapes=(("toy", 2048, 16, 4096),), training_shape=("tiny", 2, 16),
                    repeats=1)  # fmt: skip
    (row,) = data["heads"]
    assert row["chunk_rows"] == 128 and row["full_seconds"] > 0 and row["chunked_seconds"] > 0
    if row["full_peak_bytes"] is None:
        pytest.skip("peak memory cannot be read on this platform")
    assert row["chunked_peak_bytes"] < 0.5 * row["full_peak_bytes"]
    assert data["training"]["full_seconds"] > 0 and data["training"]["chunked_seconds"] > 0
    table = loss.loss_table({"cpu": data})
    assert "| head of toy |" in table and "whole training step of `tiny`" in table
    assert "chunked loss takes" in loss.loss_reading(data)
    assert "| toy: 2,048 tokens, H 16, V 4,096, slices of 128 |" in loss.loss_detail(data)


def test_command_line_help():
    with pytest.raises(SystemExit) as exit_info:
        loss.main(["--help"])
    assert exit_info.value.code == 0
