"""bench/ablation.py and bench/checkpointing.py: every variant is a valid config, the table
pairs seeds with the default correctly, a real (tiny, seconds-long) run feeds it; the
checkpointing benchmark measures three modes and keeps the gradients' memory out of none's."""

import pytest
import torch

from bench import ablation, checkpointing, race
from tests.conftest import write_words_corpus


def test_every_variant_builds_and_changes_only_its_own_settings():
    base = race.preset_config()
    for name in ablation.VARIANTS:
        overrides = ablation.variant_overrides(name)
        model_settings = {k: v for k, v in overrides.items() if k != "compile"}
        config = base.replaced(**model_settings)
        changed = {k for k, v in config.to_dict().items() if base.to_dict().get(k) != v}
        assert changed == set(model_settings), name


def _record(seed: int, bpcs: dict[str, float]) -> dict:
    entries = {name: {"params": 10, "tokens_per_s": 100.0 + i, "val_bpc": bpc, "tokens": 6000,
                      "train_seconds": 60.0, "warm_up_seconds": 2.0 + 2 * i}
               for i, (name, bpc) in enumerate(bpcs.items())}  # fmt: skip
    settings = race.RaceSettings(seconds=60.0, seed=seed).to_dict()
    return {"settings": settings, "date": "d", "machine": "m", "entries": entries}


def test_summary_pairs_each_seed_with_its_default():
    records = [_record(0, {"default": 2.0, "xpos": 1.9, "deepnorm": 2.3}),
               _record(1, {"default": 2.4, "xpos": 2.5, "deepnorm": 2.5}),
               _record(2, {"default": 2.2, "xpos": 2.1})]  # deepnorm failed in seed 2  # fmt: skip
    (group,) = ablation.groups(records)
    rows = {row["name"]: row for row in ablation.summary_rows(group)}
    assert rows["xpos"]["delta"][0] == pytest.approx((-0.1 + 0.1 - 0.1) / 3)
    assert rows["xpos"]["wins"] == 2 and rows["xpos"]["paired"] == 3
    assert rows["deepnorm"]["seeds"] == [0, 1] and rows["deepnorm"]["wins"] == 0
    assert rows["deepnorm"]["delta"][0] == pytest.approx(0.2)
    assert rows["default"]["bpc"][0] == pytest.approx(2.2)
    assert "srte" not in rows  # not run: no row
    assert rows["deepnorm"]["with_warm_up"][0] == pytest.approx(6000 / (60 + 6))
    text = ablation.markdown(records)
    assert (
        "| xpos: XPos, scale base 512 | 05 | 10 | 2.167 ± 0.306 | -0.033 ± 0.115 | 2 of 3 |" in text
    )
    assert "an earlier `tiny`" in text  # 10 parameters: not today's tiny


def test_runs_of_an_earlier_tiny_are_told_apart():
    today = race.entry_parameters(["hybrid"])["hybrid"]
    old = [_record(0, {"default": 2.0})]  # a record from before the design field: by its count
    assert "earlier `tiny`" in ablation.earlier_tiny_note(old)
    old[0]["entries"]["default"]["params"] = today
    assert ablation.earlier_tiny_note(old) == ""
    named = [{**_record(0, {"default": 2.0}), "design": race.current_design()}]
    assert ablation.earlier_tiny_note(named) == ""  # the design field decides where it is set
    named[0]["design"] = "A-M-A-M, plain"
    assert "earlier `tiny`" in ablation.earlier_tiny_note(named)


@pytest.mark.slow
def test_a_short_real_ablation_run_feeds_the_table(tmp_path):
    corpus = str(write_words_corpus(tmp_path / "corpus") / "*.txt")
    settings = race.RaceSettings(seconds=1.0, eval_blocks=2, batch_size=2, seq_len=32)
    record = ablation.run(["default", "layer_scale"], settings, corpus=corpus,
                          data_dir=tmp_path / "data", echo=lambda line: None)  # fmt: skip
    assert set(record["entries"]) == {"default", "layer_scale"}
    for result in record["entries"].values():
        assert "error" not in result, result
        assert result["steps"] >= 1 and result["val_bpc"] > 0
    assert (
        record["entries"]["layer_scale"]["params"] - record["entries"]["default"]["params"]
        == 128 * 6
    )  # LayerScale: H per residual branch (4 mixers + 2 FFNs in tiny)
    assert record["design"] == race.current_design()
    ablation.save_record(record, tmp_path / "ablation.json")
    text = ablation.markdown(race.load_records(tmp_path / "ablation.json"))
    assert "layer_scale" in text and "earlier `tiny`" not in text


@pytest.mark.slow
def test_checkpointing_benchmark_saves_memory_in_the_order_of_what_it_keeps():
    # one fresh process per mode: the modes' peaks lie ~9 MiB apart, runs of one mode within ~2
    results = {r.mode: r for r in checkpointing.measure("tiny", batch_size=4, seq_len=256,
                                                         repeats=1, memory_runs=1)}  # fmt: skip
    assert list(results) == list(checkpointing.MODES)
    exact = [results[mode].tensor_peak_bytes for mode in ("layers", "branches", "none")]
    assert 0 < exact[0] < exact[1] < exact[2]  # counted exactly, on every platform
    if results["none"].peak_bytes is None:
        pytest.skip("peak memory cannot be read on this platform")
    assert (
        results["layers"].peak_bytes < results["branches"].peak_bytes < results["none"].peak_bytes
    )
    assert all(r.seconds > 0 for r in results.values())


def test_checkpointing_table_reads_records_saved_before_the_exact_count():
    record = {"settings": {"preset": "small", "batch_size": 2, "seq_len": 512}, "machine": "m",
              "date": "2000-01-01 00:00 UTC",
              "results": [{"mode": mode, "peak_bytes": 2**20 * mib, "seconds": 1.0}
                          for mode, mib in (("none", 4), ("branches", 3), ("layers", 2))]}  # fmt: skip
    assert "| layers | 2.0 | 0.50 | n/a | n/a | 1.00 | 1.00 |" in checkpointing.markdown(record)


def test_checkpointing_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="expected one of"):
        checkpointing.build("tiny", "attention", torch.device("cpu"))
