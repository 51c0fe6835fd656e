"""Benchmarks that print side-by-side tables (``python -m bench.<name>``)."""

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # saved measurements the chapters read
