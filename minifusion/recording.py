"""Chapter 12 — forward passes that no gate monitor should count.

A distributed evaluation runs padding passes so that every rank joins every collective; their
gate statistics would count tokens twice. :func:`not_recorded` marks such passes; the
:class:`~minifusion.monitor.GateMonitor` skips them. It lives apart from the monitor so that the
evaluation code can use it without importing the monitor (which imports the evaluation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_paused = 0  # > 0 inside `not_recorded()`: forward passes that no monitor should count


@contextmanager
def not_recorded() -> Iterator[None]:
    """Forward passes inside are not counted by any :class:`~minifusion.monitor.GateMonitor`
    (e.g. the padding passes a distributed evaluation runs so that every rank joins every
    collective)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def recording_paused() -> bool:
    """Whether the current forward pass runs inside :func:`not_recorded`."""
    return _paused > 0
