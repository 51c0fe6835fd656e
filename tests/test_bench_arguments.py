"""bench/arguments.py: every benchmark command refuses a size or count below 1 by name, before
measuring anything (they failed inside the measurement: an empty median, a zero-size tensor,
or, for bench.training's --seq-len 0, silently used the preset's length), and a folder given
where its results are to be written (that failed after the whole run)."""

from __future__ import annotations

import importlib

import pytest

from bench.arguments import non_negative_float, non_negative_int, output_file, positive_int


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("attention", ["--repeats", "0"]),
        ("attention", ["--seq-lens", "64", "0"]),
        ("checkpointing", ["--batch-size", "0"]),
        ("decode", ["--new-tokens", "-2"]),
        ("loss", ["--chunk-rows", "0"]),
        ("moe", ["--tokens", "0"]),
        ("scan", ["--d-state", "0"]),
        ("training", ["--seq-len", "0"]),
        ("training", ["--warmup-steps", "-1"]),
    ],
)
def test_each_command_names_the_flag_it_refuses(module, flags, capsys):
    command = importlib.import_module(f"bench.{module}")
    with pytest.raises(SystemExit) as stop:
        command.main(flags)
    bound = "≥ 0" if flags[0] == "--warmup-steps" else "≥ 1"
    assert stop.value.code == 2
    assert f"argument {flags[0]}: must be {bound}, not {flags[-1]}" in capsys.readouterr().err


def test_the_types_keep_what_they_accept():
    assert positive_int("1") == 1 and non_negative_int("0") == 0
    with pytest.raises(ValueError):  # not a number at all: argparse's own "invalid ... value"
        positive_int("many")


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        ("scan", ["--min-seconds", "-1"], "argument --min-seconds: must be a finite number ≥ 0"),
        ("scan", ["--min-seconds", "nan"], "argument --min-seconds: must be a finite number ≥ 0"),
        ("scan", ["--save", "{tmp}"], "argument --save: {tmp} is a folder; give the file to write"),
        ("long_context", ["--out", "{tmp}"], "argument --out: {tmp} is a folder"),
        ("why_hybrid", ["--out", "{tmp}"], "argument --out: {tmp} is a folder"),
        ("long_context", ["--model", "{tmp}/run/model"], "is not an exported model"),
    ],
)
def test_outputs_and_inputs_are_checked_before_the_run(module, flags, message, tmp_path, capsys):
    command = importlib.import_module(f"bench.{module}")
    with pytest.raises(SystemExit) as stop:  # the check comes before any measurement
        command.main([flag.format(tmp=tmp_path) for flag in flags])
    assert stop.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_the_file_and_seconds_types_keep_what_they_accept(tmp_path):
    assert non_negative_float("0") == 0.0 and non_negative_float("2.5") == 2.5
    assert output_file(str(tmp_path / "new.json")) == tmp_path / "new.json"
