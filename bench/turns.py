"""Entries that take turns on the CPU, so that a slow stretch of the host slows them all alike.

On a virtual machine the same training step can run 10–25 % slower for minutes at a time (a
neighbour's load, the host's clock), invisibly from inside. Raced one after another, such a
stretch lands on whichever entry happens to be running, and at an equal wall-clock budget a
slower entry takes fewer steps and ends with a worse score — the table then ranks the host.

Here every entry's process starts first (and imports its libraries), then they train in turns
of ``turn_seconds`` of *training* time each, round-robin, one process at a time (two at once
would share the cores). A slow minute is then spread over every entry, and what differs between
them is their own speed. Each entry still counts only its own steps towards its budget, sees
the same batches and takes the same steps as it would alone: only *when* its steps run changes.

The protocol, one line per message:

* worker → coordinator, on the control pipe (``--control-fd``): ``ready`` once its imports are
  done, ``pause`` at the end of a turn, ``done`` when its result is written (or the pipe
  closes: the process ended);
* coordinator → worker, on its standard input: ``go`` to start a turn.

Building the model, the untimed warm-up pass and scoring the validation set happen inside the
entry's turns too, so nothing but the idle, waiting processes ever runs alongside a timed step.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO

READY, PAUSE, DONE, GO = "ready", "pause", "done", "go"


# ==============================================================================================
# The worker's side
# ==============================================================================================
class TurnTaker:
    """Called after every training step with the training seconds so far; hands the CPU back to
    the coordinator whenever another ``turn_seconds`` have been spent, and waits for its next
    turn (outside the timed part of the step)."""

    def __init__(self, turn_seconds: float, control: IO[str], go: IO[str] = sys.stdin) -> None:
        if turn_seconds <= 0:
            raise ValueError(f"turn_seconds must be positive, got {turn_seconds}")
        self.turn_seconds = turn_seconds
        self.next_pause = turn_seconds
        self.control, self.go = control, go
        self.turns = 0

    @classmethod
    def from_fd(cls, turn_seconds: float, fd: int) -> TurnTaker:
        return cls(turn_seconds, os.fdopen(fd, "w", buffering=1, encoding="utf-8"))

    def _send(self, message: str) -> None:
        self.control.write(message + "\n")
        self.control.flush()

    def _wait(self) -> None:
        line = self.go.readline()
        if line.strip() != GO:  # the coordinator closed our stdin: it is gone
            raise SystemExit(f"turns: expected '{GO}' from the race, got {line!r}")
        self.turns += 1

    def ready(self) -> None:
        """Imports done: tell the coordinator, and wait for the first turn."""
        self._send(READY)
        self._wait()

    def __call__(self, training_seconds: float) -> None:
        if training_seconds < self.next_pause:
            return
        while self.next_pause <= training_seconds:  # a step longer than a turn skips ahead
            self.next_pause += self.turn_seconds
        self._send(PAUSE)
        self._wait()

    def done(self) -> None:
        self._send(DONE)


# ==============================================================================================
# The coordinator's side
# ==============================================================================================
class _Worker:
    """One started process, its control pipe and what it has said so far."""

    def __init__(self, command: list[str], cwd: str | os.PathLike, env: dict[str, str]) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [*command, "--control-fd", str(write_fd)], cwd=cwd, env=env,
                stdin=subprocess.PIPE, pass_fds=(write_fd,), text=True,
            )  # fmt: skip
        finally:
            os.close(write_fd)  # the child holds its own copy; ours would hide its end of file
        self.fd, self.buffer = read_fd, b""
        self.finished = False

    def message(self, timeout: float) -> str | None:
        """The next line it sends; ``DONE`` when the pipe closes, ``None`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 256)
            if not chunk:
                return DONE
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()

    def go(self) -> bool:
        try:
            self.process.stdin.write(GO + "\n")
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError):  # it has exited
            return False

    def finish(self, kill: bool = False) -> int:
        if kill:
            self.process.kill()
        self.finished = True
        try:
            self.process.stdin.close()
        except OSError:
            pass
        code = self.process.wait()
        os.close(self.fd)
        return code


def run_in_turns(
    commands: Sequence[list[str]],
    turn_seconds: float,
    *,
    cwd: str | os.PathLike,
    env: dict[str, str],
    timeout: float,
    on_finish: Callable[[int, int | None], None] = lambda index, code: None,
) -> list[int | None]:
    """Start every command (a worker that speaks the protocol above), wait until all are
    ready, then give them turns round-robin, in the order given, until each is done.

    ``timeout`` bounds one turn (plus what the worker does in it: building, warm-up, scoring)
    and the wait for ``ready``; a worker past it is killed. ``on_finish(index, exit code)`` is
    called as each ends (``None`` for a killed one). Returns the exit codes in order."""
    workers = [_Worker(command, cwd, env) for command in commands]
    codes: list[int | None] = [None] * len(workers)

    def end(index: int, kill: bool = False) -> None:
        code = workers[index].finish(kill=kill)
        codes[index] = None if kill else code
        on_finish(index, codes[index])

    try:
        for index, worker in enumerate(workers):
            said = worker.message(timeout)
            if said != READY:  # exited (DONE) or hung (None) before its first turn
                end(index, kill=said is None)
        while not all(worker.finished for worker in workers):
            for index, worker in enumerate(workers):
                if worker.finished:
                    continue
                said = worker.message(timeout) if worker.go() else DONE
                if said == DONE or said is None:
                    end(index, kill=said is None)
                elif said != PAUSE:
                    raise RuntimeError(f"turns: worker {index} said {said!r}")
    finally:
        for index, worker in enumerate(workers):
            if not worker.finished:
                end(index, kill=True)
    return codes
