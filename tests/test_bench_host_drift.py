"""bench/host_drift.py: copies of one entry raced in both schedules, their spread, the record."""

import math

import pytest

from bench import host_drift, race
from tests.conftest import write_words_corpus


@pytest.fixture(scope="module")
def race_data(tmp_path_factory):
    """``(corpus glob, data folder)``: a small local corpus of random words, prepared once."""
    root = tmp_path_factory.mktemp("drift")
    corpus = str(write_words_corpus(root / "corpus") / "*.txt")
    race.prepare_race_data(corpus, root / "data")
    return corpus, root / "data"


def copy(tokens_per_s: float, bpc: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "val_bpc": bpc, "steps": 10, "params": 1}


def test_the_spread_of_the_copies():
    s = host_drift.spread({"copy 1": copy(15_000, 2.44), "copy 2": copy(16_200, 2.41),
                           "copy 3": {"error": "boom"}})  # fmt: skip
    assert s["speed_ratio"] == pytest.approx(16_200 / 15_000)
    assert s["bpc_range"] == pytest.approx(0.03)
    assert host_drift.spread({"copy 1": copy(1, 2), "copy 2": {"error": "x"}}) is None


def test_records_are_kept_per_machine_entry_and_budget_and_rendered(tmp_path):
    path = tmp_path / "host_drift.json"

    def record(machine, seconds, bpc):
        schedules = {
            "one after another": {"copy 1": copy(15_000, bpc), "copy 2": copy(16_000, 2.5)},
            "in turns of 10 s": {"copy 1": copy(15_500, 2.45), "copy 2": copy(15_600, 2.46)},
        }
        return {"entry": "hybrid", "corpus": race.CORPUS, "seconds": seconds, "eval_blocks": 32,
                "date": "d", "machine": machine, "schedules": schedules}  # fmt: skip

    host_drift.save_record(record("A", 90, 2.4), path)
    host_drift.save_record(record("B", 90, 2.4), path)
    saved = host_drift.save_record(record("A", 90, 2.3), path)  # replaces A's 90 s run
    assert [(r["machine"], r["schedules"]["one after another"]["copy 1"]["val_bpc"]) for r in saved] \
        == [("B", 2.4), ("A", 2.3)]
    text = host_drift.markdown(saved)
    assert "| one after another | 15,000, 16,000 | 1.067 | 2.300, 2.500 | 0.200 |" in text
    assert "| in turns of 10 s | 15,500, 15,600 | 1.006 | 2.450, 2.460 | 0.010 |" in text
    assert host_drift.markdown([]).startswith("No run saved yet")


def test_bad_requests_are_refused_before_any_training(monkeypatch):
    with pytest.raises(ValueError, match="at least 2"):
        host_drift.run(copies=1)
    with pytest.raises(ValueError, match="unknown entry 'gpt3'"):
        host_drift.run(entry="gpt3")
    monkeypatch.setattr(race, "prepare_race_data", lambda *a: pytest.fail("refused too late"))
    with pytest.raises(SystemExit, match="host_drift: error: --seconds must be finite and > 0"):
        host_drift.main(["--seconds", "0", "--no-save"])


@pytest.mark.slow
def test_copies_of_one_entry_in_both_schedules(race_data):
    corpus, data_dir = race_data
    lines: list[str] = []
    record = host_drift.run("attention", copies=2, seconds=1.0, corpus=corpus, data_dir=data_dir,
                            echo=lines.append)  # fmt: skip
    assert list(record["schedules"]) == ["one after another", "in turns of 10 s"]
    for results in record["schedules"].values():
        assert list(results) == ["copy 1", "copy 2"]
        for result in results.values():
            assert "error" not in result, result
            assert math.isfinite(result["val_bpc"]) and result["steps"] >= 1
    # the same seed: the same weights, so the same parameter count and the same first loss
    assert len({r["params"] for s in record["schedules"].values() for r in s.values()}) == 1
    assert len(lines) == 6 and all(line.startswith("[host_drift]") for line in lines)
