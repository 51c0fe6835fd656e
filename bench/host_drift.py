"""The race's noise floor: one entry raced against copies of itself, one after another and in turns.

The copies are the same model with the same seed — the same weights, batches and steps — so in a
perfectly steady machine they would train at the same speed and, at an equal wall-clock budget,
end with the same score. Whatever separates them is the host: on a virtual machine a step can
run 10–25 % slower for minutes at a time, invisibly to the load average. Raced one after
another (as :mod:`bench.race` did before its entries took turns), a slow stretch lands on one
copy; in turns (:mod:`bench.turns`) it is shared. The spread of each schedule is the smallest
gap between two entries that a single race can tell apart.

    python -m bench.host_drift                      # 3 copies of the hybrid, 90 s each, both ways
    python -m bench.host_drift --entry attention --copies 4 --seconds 60
    python -m bench.host_drift --show               # the saved runs as Markdown

Results go to ``bench/results/host_drift.json`` (one record per machine, entry and budget), which
chapter 16c reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import RESULTS_DIR, race
from .timing import machine_description

RESULTS_FILE = RESULTS_DIR / "host_drift.json"
SCHEDULES = (0.0, race.TURN_SECONDS)  # turn_seconds: one after another, then in turns
DEFAULT_SECONDS = 90.0
DEFAULT_COPIES = 3
EVAL_BLOCKS = 32  # validation blocks scored: spread evenly, the same for every copy


def run(
    entry: str = "hybrid",
    copies: int = DEFAULT_COPIES,
    seconds: float = DEFAULT_SECONDS,
    *,
    corpus: str = race.CORPUS,
    data_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``copies`` copies of ``entry`` raced for ``seconds`` each in every schedule of
    :data:`SCHEDULES`; the record (settings, machine, and per schedule the copies' results)."""
    if copies < 2:
        raise ValueError(f"copies must be at least 2 to have a spread, got {copies}")
    if entry not in race.ENTRIES:
        raise ValueError(f"unknown entry {entry!r}; choose one of {', '.join(race.ENTRIES)}")
    race.RaceSettings(seconds=seconds)  # refuses a budget no copy can train for, before the data
    data, _ = race.prepare_race_data(corpus, data_dir)
    schedules = {}
    for turn in SCHEDULES:
        settings = race.RaceSettings(seconds=seconds, eval_blocks=EVAL_BLOCKS, turn_seconds=turn)
        label = race.schedule_text(settings.to_dict(), copies)
        echo(f"[host_drift] {copies} copies of {entry} × {seconds:g} s, {label}")
        jobs = {f"copy {i}": (entry, None) for i in range(1, copies + 1)}

        def finished(copy: str, result: dict[str, Any]) -> None:
            echo(race.entry_line(copy, result).replace("[race]", "[host_drift]"))

        results = race.run_workers(jobs, settings, data, finished)
        schedules[label] = results
    return {
        "entry": entry,
        "corpus": corpus,
        "seconds": seconds,
        "eval_blocks": EVAL_BLOCKS,
        "date": race._now(),
        "machine": machine_description(torch.device("cpu")),
        "schedules": schedules,
    }


def spread(results: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """The copies' tokens/s and bpc ranges: ``fastest ÷ slowest`` and ``bpc max − min``
    (``None`` when fewer than two copies finished)."""
    done = [r for r in results.values() if "error" not in r]
    if len(done) < 2:
        return None
    speeds, bpcs = [r["tokens_per_s"] for r in done], [r["val_bpc"] for r in done]
    return {"speed_ratio": max(speeds) / min(speeds), "bpc_range": max(bpcs) - min(bpcs),
            "speed_min": min(speeds), "speed_max": max(speeds),
            "bpc_min": min(bpcs), "bpc_max": max(bpcs)}  # fmt: skip


def _key(record: dict[str, Any]) -> tuple:
    return record["machine"], record["entry"], record.get("corpus", race.CORPUS), record["seconds"]


def load_records(path: str | Path = RESULTS_FILE) -> list[dict[str, Any]]:
    return race.load_records(path)


def save_record(record: dict[str, Any], path: str | Path = RESULTS_FILE) -> list[dict[str, Any]]:
    """Add ``record``, replacing a saved one of the same machine, entry, corpus and budget."""
    records = [r for r in load_records(path) if _key(r) != _key(record)] + [record]
    race.write_records(records, path, benchmark="host_drift")
    return records


def record_markdown(record: dict[str, Any], level: int = 3) -> str:
    lines = [
        f"{'#' * level} {record['entry']} against itself · {record['seconds']:g} s per copy",
        "",
        f"{record['date']}, {record['machine']}. Validation: {record['eval_blocks']} blocks.",
        "",
        "| schedule | tokens/s of each copy | fastest ÷ slowest | val bpc of each copy | "
        "bpc max − min |",
        "|---|---|---|---|---|",
    ]
    for schedule, results in record["schedules"].items():
        s = spread(results)
        speeds = ", ".join(f"{r['tokens_per_s']:,.0f}" if "error" not in r else "failed"
                           for r in results.values())  # fmt: skip
        bpcs = ", ".join(f"{r['val_bpc']:.3f}" if "error" not in r else "failed"
                         for r in results.values())  # fmt: skip
        ratio = f"{s['speed_ratio']:.3f}" if s else "–"
        gap = f"{s['bpc_range']:.3f}" if s else "–"
        lines.append(f"| {schedule} | {speeds} | {ratio} | {bpcs} | {gap} |")
    return "\n".join(lines)


def markdown(records: list[dict[str, Any]], level: int = 3) -> str:
    if not records:
        return "No run saved yet: `python -m bench.host_drift`."
    return "\n\n".join(record_markdown(r, level) for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.host_drift",
        description="Race one entry against copies of itself (same seed: same weights, batches "
        "and steps), one after another and in turns; the spread of speed and score between the "
        "copies is the host's, the smallest gap a single race can resolve. Saved to "
        f"{RESULTS_FILE.relative_to(race.ROOT)}.",
    )
    parser.add_argument("--entry", choices=list(race.ENTRIES), default="hybrid",
                        help="the bench.race entry to copy (%(default)s)")  # fmt: skip
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES,
                        help="copies per schedule (%(default)s)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help="training seconds per copy (%(default)g)")  # fmt: skip
    parser.add_argument("--no-save", action="store_true", help="do not write the results file")
    parser.add_argument("--show", action="store_true", help="print the saved runs and exit")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.show:
        print(markdown(load_records(args.results)))
        return 0
    try:
        record = run(args.entry, args.copies, args.seconds)
    except ValueError as error:  # a refused --copies or --seconds
        raise SystemExit(f"python -m bench.host_drift: error: {error}") from None
    print()
    print(record_markdown(record))
    if not args.no_save:
        save_record(record, args.results)
        print(f"\n[host_drift] saved to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
