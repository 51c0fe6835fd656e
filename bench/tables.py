"""The CPU | GPU tables of ``bench/RESULTS.md``: what every benchmark's rendering shares.

:mod:`bench.report` keeps each benchmark's results per device (``{"cpu": data, "gpu": data}``,
either may be missing) and assembles RESULTS.md; each benchmark module renders its own section
from them (``scan_table`` in :mod:`bench.scan`, ``race_table`` in :mod:`bench.race`, …) with
these helpers: a Markdown table with one column group per device (:func:`grouped_table`), the
keys of every device's rows, a ratio cell, and one block per device for sections that are
Markdown already. It imports nothing from ``bench``, so any benchmark module can use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

DEVICES = ("cpu", "gpu")
GROUP = {"cpu": "CPU", "gpu": "GPU"}
MISSING = "—"

Data = dict[str, Any]  # one benchmark's JSON-able results on one device
PerDevice = dict[str, Data]  # {"cpu": data, "gpu": data}, either may be missing


def grouped_table(
    key_header: str,
    columns: list[str],
    cells: dict[str, dict[Any, list[str]]],
    keys: list[Any] | None = None,
    label: Callable[[Any], str] = str,
) -> str:
    """A Markdown table: one row per key, then ``columns`` once for the CPU and once for the GPU.

    ``cells[device][key]`` is a row's cells for that device; a device or key without them shows
    ``—``. ``keys`` fixes the row order (default: every key seen, in order of appearance).
    """
    if keys is None:
        keys = list(dict.fromkeys(k for device in DEVICES for k in cells.get(device, {})))
    header = [key_header] + [f"{GROUP[d]}: {c}" for d in DEVICES for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        row = [label(key)]
        for device in DEVICES:
            row += cells.get(device, {}).get(key) or [MISSING] * len(columns)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _sorted_union(per_device: PerDevice, keys_of: Callable[[Data], Iterable[Any]]) -> list[Any]:
    return sorted({k for data in per_device.values() for k in keys_of(data)})


def _ratio(value: float | None, reference: float | None, suffix: str = "") -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}{suffix}"


def _device_blocks(per_device: PerDevice, render: Callable[[Data], str], missing: str) -> str:
    """``render(data)`` under a ``### CPU`` / ``### GPU`` heading for each device that ran."""
    blocks = [f"### {GROUP[d]}\n\n{render(per_device[d])}" for d in DEVICES if d in per_device]
    return "\n\n".join(blocks) if blocks else missing
