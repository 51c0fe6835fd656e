"""bench/arguments.py: every benchmark command refuses a size or count below 1 by name, before
measuring anything (they failed inside the measurement: an empty median, a zero-size tensor,
or, for bench.training's --seq-len 0, silently used the preset's length)."""

from __future__ import annotations

import importlib

import pytest

from bench.arguments import non_negative_int, positive_int


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
