"""Argument types shared by the benchmark commands: a size or a count of 0 (or less) is refused
by argparse with the flag named (``argument --repeats: must be ≥ 1, not 0``) instead of failing
later inside a measurement (an empty median, a zero-size tensor)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer ≥ 1 (sizes, lengths, counts of repeats and steps)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (warm-up steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, not {value}")
    return value
