"""Entries taking turns on the CPU (bench/turns.py): one process at a time, round-robin, each
pausing only after whole turns of its own training time; crashed and hung workers are ended."""

import io
import json
import sys
import textwrap

import pytest

from bench import race, turns

ROOT = race.ROOT

# A stand-in for a race worker: "trains" STEPS steps of one second each (by its own count), logs
# when each really starts and ends, and speaks the protocol through TurnTaker.
FAKE_WORKER = textwrap.dedent(
    """
    import sys, time
    from bench.turns import TurnTaker

    name, log, steps, turn = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if name == "crash":
        raise SystemExit(3)
    taker = TurnTaker.from_fd(turn, int(sys.argv[sys.argv.index("--control-fd") + 1]))
    taker.ready()
    if name == "hang":
        time.sleep(60)
    seconds = 0.0
    for step in range(steps):
        with open(log, "a") as f:
            f.write(f"start {name}\\n")
        time.sleep(0.02)
        seconds += 1.0
        with open(log, "a") as f:
            f.write(f"end {name}\\n")
        if step < steps - 1:
            taker(seconds)
    taker.done()
    """
)


def fake_commands(tmp_path, workers: list[tuple[str, int]], turn: float):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    log = tmp_path / "steps.log"
    commands = [[sys.executable, str(script), name, str(log), str(steps), str(turn)]
                for name, steps in workers]  # fmt: skip
    return commands, log


def run_fake(tmp_path, workers, turn, timeout=60.0):
    commands, log = fake_commands(tmp_path, workers, turn)
    ended: list[tuple[int, int | None]] = []
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    codes = turns.run_in_turns(commands, turn, cwd=ROOT, env=env, timeout=timeout,
                               on_finish=lambda i, code: ended.append((i, code)))  # fmt: skip
    lines = log.read_text().split() if log.exists() else []
    return codes, ended, lines


def test_workers_take_whole_turns_round_robin_one_at_a_time(tmp_path):
    # turns of 2 steps: a has 5 steps, b 3, c 1
    codes, ended, words = run_fake(tmp_path, [("a", 5), ("b", 3), ("c", 1)], turn=2.0)
    assert codes == [0, 0, 0]
    events = list(zip(words[::2], words[1::2]))
    # never two at once: every step ends before the next one (of anyone) starts
    assert [kind for kind, _ in events] == ["start", "end"] * (len(events) // 2)
    order = "".join(name for kind, name in events if kind == "start")
    assert order == "aabbcaaba"
    assert [index for index, _ in ended] == [2, 1, 0]  # c ends in round 1, b in 2, a in 3


def test_a_crashed_and_a_hung_worker_are_ended_and_the_others_go_on(tmp_path):
    codes, ended, words = run_fake(tmp_path, [("crash", 2), ("a", 3), ("hang", 2)], turn=1.0,
                                   timeout=3.0)  # fmt: skip
    assert codes == [3, 0, None]  # None: killed after the timeout
    assert "".join(words[1::2]) == "aaaaaa"  # start a, end a, three times
    assert sorted(index for index, _ in ended) == [0, 1, 2]


def test_a_turn_taker_pauses_after_each_whole_turn_of_training_time():
    control, go = io.StringIO(), io.StringIO("go\ngo\ngo\n")
    taker = turns.TurnTaker(10.0, control, go)
    taker.ready()
    for seconds in (3.0, 9.9, 10.1, 12.0, 25.0, 29.0):
        taker(seconds)
    taker.done()
    # paused at 10.1 (after the first 10 s) and at 25.0 (a long step: the next pause is at 30)
    assert control.getvalue().split() == ["ready", "pause", "pause", "done"]
    assert taker.turns == 3 and taker.next_pause == 30.0
    with pytest.raises(SystemExit, match="expected 'go'"):
        taker(31.0)  # the coordinator is gone: no 'go' to read
    with pytest.raises(ValueError, match="positive"):
        turns.TurnTaker(0.0, control, go)


def test_records_say_how_the_entries_shared_the_cpu():
    assert race.RaceSettings().turn_seconds == race.TURN_SECONDS == 10.0
    assert race.schedule_text(race.RaceSettings().to_dict(), 3) == "in turns of 10 s"
    assert race.schedule_text(race.RaceSettings(turn_seconds=0).to_dict()) == "one after another"
    assert race.schedule_text(race.RaceSettings().to_dict(), 1) == "one after another"
    old = race.RaceSettings().to_dict()
    del old["turn_seconds"]  # a record saved before turns existed
    assert race.RaceSettings.from_dict(old).turn_seconds == 0.0
    assert race.schedule_text(old, 3) == "one after another"
    args = race.parse_args(["--turn-seconds", "5"])
    assert race.settings_from_args(args).turn_seconds == 5.0


@pytest.mark.parametrize("turn_seconds", [0.0, 5.0])
def test_workers_that_fail_report_their_reasons_in_either_schedule(tmp_path, turn_seconds):
    missing = {k: str(tmp_path / k) for k in ("train", "val", "tokenizer")}
    settings = race.RaceSettings(seconds=1.0, turn_seconds=turn_seconds)
    seen: list[str] = []
    results = race.run_workers({"x": ("llama", None), "y": ("attention", {"bad": 1})}, settings,
                               missing, lambda label, result: seen.append(label))  # fmt: skip
    assert sorted(seen) == ["x", "y"] and list(results) == ["x", "y"]
    assert all("error" in result for result in results.values())
    assert json.dumps(results)  # JSON-able, as saved
