"""Summaries of repeated runs: the mean and spread of one score over seeds, and who wins in all."""

from __future__ import annotations

from collections.abc import Sequence


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def wins_in_every_seed(
    best: Sequence[float], other: Sequence[float], higher: bool
) -> tuple[int, bool]:
    """``(seeds where best beats other, whether that is all of them)``; a tie is not a win."""
    wins = sum((b > o) if higher else (b < o) for b, o in zip(best, other, strict=True))
    return wins, wins == len(best)
