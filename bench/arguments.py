"""Argument types shared by the benchmark commands: a size or a count of 0 (or less), or a folder
where a file is to be written, is refused by argparse with the flag named (``argument --repeats:
must be ≥ 1, not 0``) instead of failing later inside a measurement (an empty median, a zero-size
tensor) or after it (a result that cannot be saved)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


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


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0 (seconds to spend timing)."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, not {text}")
    return value


def output_file(text: str) -> Path:
    """A file to write results to: not an existing folder (checked before the benchmark runs)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is a folder; give the file to write, e.g. {path / 'results.json'}"
        )
    return path
