"""bench/race.py: entry sizes, the schedule, bits per character, saved records, a quick race.

The data is a small local corpus of random words (no network). No test looks at a speed: the
quick race only checks that two entries, each in its own process, finish with finite scores.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench import race
from minifusion.data import TokenFile
from minifusion.tokenizer import load_tokenizer
from minifusion.training import ValidationSet
from tests.conftest import write_words_corpus


@pytest.fixture(scope="module")
def race_data(tmp_path_factory):
    """``(corpus glob, data folder, token file paths, held-out works)``, prepared once."""
    root = tmp_path_factory.mktemp("race")
    corpus = str(write_words_corpus(root / "corpus") / "*.txt")
    data, works = race.prepare_race_data(corpus, root / "data")
    return corpus, root / "data", data, works


# ---------------------------------------------------------------------------------- sizes ---
def test_entries_are_sized_to_the_attention_twin():
    counts = race.entry_parameters()
    base = race.preset_config()
    n = base.num_hidden_layers
    plain = {
        m: base.replaced(mixer_types=[m] * n, ffn_types=["dense"] * n,
                         global_attention_layers=None)  # fmt: skip
        for m in ("attention", "mamba")
    }
    twin = counts["attention"]
    assert twin == plain["attention"].estimate_parameters()
    for name in ("llama", "gpt2", "falcon_h1", "mamba2"):
        assert abs(counts[name] / twin - 1) <= 0.10, (name, counts[name], twin)
    # the preset as shipped and its Mamba twin keep their own sizes (larger: see the docstring)
    assert counts["hybrid"] == base.estimate_parameters()
    assert counts["mamba"] == plain["mamba"].estimate_parameters()


def test_twins_get_a_feed_forward_block_in_every_layer():
    base = race.preset_config().replaced(mixer_types=["mamba", "attention", "attention", "attention"],
                                         ffn_types=["none", "dense", "dense", "dense"])  # fmt: skip
    for mixer in ("attention", "mamba"):
        twin = race.minifusion_config(mixer, base)
        assert twin.mixer_types == [mixer] * 4 and twin.ffn_types == ["dense"] * 4
    assert race.minifusion_config("hybrid", base) is base


def test_solve_width_picks_the_closest_count():
    def make(width: int) -> nn.Module:
        return nn.Linear(10, width)  # 11 parameters per unit of width

    assert race.solve_width(make, 11 * 37) == 37
    assert race.solve_width(make, 11 * 37 + 5) == 37
    assert race.solve_width(make, 11 * 37 + 6) == 38
    assert race.solve_width(make, 3) == 1


# ------------------------------------------------------------------------------- schedule ---
def test_learning_rate_warms_up_then_follows_a_cosine_in_time():
    s = race.RaceSettings(seconds=100.0, lr=1e-3, warmup_steps=50, min_lr_ratio=0.1)

    def cosine(fraction: float) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction))

    assert race.learning_rate(0, 0.0, s) == pytest.approx(1e-3 / 50)
    assert race.learning_rate(24, 0.0, s) == pytest.approx(1e-3 * 25 / 50)
    assert race.learning_rate(49, 0.0, s) == pytest.approx(1e-3)
    for elapsed, multiplier in ((0.0, 1.0), (25.0, cosine(0.25)), (50.0, 0.55), (100.0, 0.1)):
        assert race.learning_rate(500, elapsed, s) == pytest.approx(1e-3 * multiplier)
    assert race.learning_rate(500, 130.0, s) == pytest.approx(1e-4)  # a last step past the end
    assert race.learning_rate(9, 50.0, s) == pytest.approx(1e-3 * 10 / 50 * 0.55)  # both factors


# ------------------------------------------------------------------------------------ bpc ---
class Uniform(nn.Module):
    """Zero logits: every token has probability 1 / vocab, so each costs log2(vocab) bits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


@pytest.mark.parametrize("blocks", [None, 3])
def test_bits_per_character_by_hand(race_data, blocks):
    *_, data, _ = race_data
    tokenizer = load_tokenizer(data["tokenizer"])
    seq_len, vocab = 16, 4096
    validation = ValidationSet(data["val"], seq_len, tokenizer)
    settings = race.RaceSettings(seq_len=seq_len, batch_size=5, eval_blocks=blocks)
    result = race.validation_bpc(Uniform(vocab), validation, settings)

    tokens = TokenFile(data["val"]).tokens
    count = (len(tokens) - 1) // seq_len  # whole blocks; block i targets tokens[iT+1 : iT+T+1]
    # every block, or 3 spread evenly: the first, the middle (rounded half to even), the last
    chosen = list(range(count)) if blocks is None else [0, round((count - 1) / 2), count - 1]
    targets = [int(t) for i in chosen for t in tokens[i * seq_len + 1 : (i + 1) * seq_len + 1]]
    text = tokenizer.decode(targets, skip_special_tokens=True)  # ASCII: no split characters
    characters = len(text) + targets.count(tokenizer.eos_token_id)
    assert result.tokens == len(targets) == seq_len * len(chosen)
    assert result.characters == characters
    assert result.bpc == pytest.approx(len(targets) * math.log2(vocab) / characters, rel=1e-6)


# --------------------------------------------------------------------------------- a race ---
@pytest.mark.slow
def test_quick_race_of_two_entries_in_their_own_processes(race_data):
    corpus, data_dir, data, works = race_data
    # in turns of half a second: each worker pauses and resumes a few times
    settings = race.RaceSettings(seconds=2.0, batch_size=4, seq_len=32, eval_blocks=4,
                                 turn_seconds=0.5)  # fmt: skip
    lines: list[str] = []
    record = race.run(["attention", "llama"], settings, corpus=corpus, data_dir=data_dir,
                      echo=lines.append)  # fmt: skip
    assert record["validation"] == {"works": works, "blocks": 4} and len(works) == 2
    for name in ("attention", "llama"):
        result = record["entries"][name]
        assert "error" not in result, result
        assert result["steps"] >= 1 and result["tokens"] == result["steps"] * 4 * 32
        assert math.isfinite(result["val_bpc"]) and result["val_bpc"] > 0
        assert math.isfinite(result["train_loss"])
        assert result["val_tokens"] == 4 * 32
    # Llama's feed-forward width is solved to the twin's count: within half of one channel's
    # parameters (3 · H per layer), as the twin's gate and QK-norm have no Llama counterpart
    base = race.preset_config()
    channel = 3 * base.hidden_size * base.num_hidden_layers
    gap = record["entries"]["llama"]["params"] - record["entries"]["attention"]["params"]
    assert abs(gap) <= channel / 2
    assert len(lines) == 3 and all(line.startswith("[race]") for line in lines)
    assert "in turns of 0.5 s" in lines[0]
    text = race.record_markdown(record)
    assert "| 1 |" in text and "| 2 |" in text and "Lowest validation bpc" in text
    # the split's size, for the epochs column: the token file's own count
    sidecar = json.loads(open(data["train"] + ".json", encoding="utf-8").read())
    assert record["train_tokens"] == sidecar["num_tokens"] > 0
    assert "| epochs |" in text and f"Training split: {record['train_tokens']:,} tokens." in text
    assert "entries trained in turns of 0.5 s." in text
    assert record["design"] == race.current_design()  # a subset without the hybrid says it too


def test_a_failing_entry_is_reported_with_its_reason(tmp_path):
    missing = {k: str(tmp_path / k) for k in ("train", "val", "tokenizer")}
    out = tmp_path / "result.json"
    assert race._worker("llama", race.RaceSettings(seconds=1.0), missing, out) == 0
    assert "error" in json.loads(out.read_text())


# ------------------------------------------------------------------------- saved records ---
def entry(bpc: float, tokens_per_s: float, params: int = 1_000_000) -> dict:
    return {"model": "m", "sizes": "s", "note": "", "params": params, "steps": 10,
            "tokens": 20_480, "train_seconds": 1.0, "tokens_per_s": tokens_per_s,
            "train_loss": 5.0, "val_loss": 5.1, "val_bpc": bpc, "val_tokens": 100,
            "val_characters": 300, "date": "d"}  # fmt: skip


def record(seconds: float, lr: float, entries: dict) -> dict:
    settings = race.RaceSettings(seconds=seconds, lr=lr).to_dict()
    return {"settings": settings, "date": "2000-01-01", "machine": "m", "preset": "tiny",
            "corpus": race.CORPUS, "validation": {"works": ["a", "b"], "blocks": "all"},
            "entries": entries}  # fmt: skip


def test_records_are_kept_per_setting_and_rendered(tmp_path):
    path = tmp_path / "race.json"
    first = {"hybrid": entry(2.1, 5000, 1_400_000), "attention": entry(2.2, 10000),
             "gpt2": {"error": "RuntimeError: boom", "date": "d"}}  # fmt: skip
    race.save_record(record(240, 1e-3, first), path)
    race.save_record(record(120, 1e-3, {"attention": entry(2.5, 10000)}), path)
    race.save_record(record(240, 3e-3, {"attention": entry(2.0, 10000)}), path)
    assert len(race.load_records(path)) == 3
    # the same settings again with two of the entries: those are replaced, the other stays
    again = {"hybrid": entry(1.9, 6000, 1_400_000), "attention": entry(2.2, 10000)}
    race.save_record(record(240, 1e-3, again), path)
    records = race.load_records(path)
    assert [(r["settings"]["seconds"], r["settings"]["lr"]) for r in records] == [
        (120, 1e-3), (240, 1e-3), (240, 3e-3)
    ]  # fmt: skip
    kept = records[1]["entries"]
    assert set(kept) == {"hybrid", "attention", "gpt2"} and kept["hybrid"]["val_bpc"] == 1.9

    text = race.markdown(records)
    assert text.count("| # | entry |") == 3
    assert "Lowest validation bpc: **hybrid** (1.900); hybrid vs its attention twin: 1.900 vs " \
           "2.200 bpc (-0.300) at 0.60× the twin's tokens/s." in text  # fmt: skip
    assert "| 1 | hybrid | m | s | 1,400,000 (+40.0%) |" in text
    assert "| – | gpt2 | failed: RuntimeError: boom |" in text
    assert text.index("| 2 | attention |") < text.index("| – | gpt2 |")
    assert race.verdict({"gpt2": {"error": "x"}}) == "No entry finished."
    assert "Warning" not in text  # no load recorded, no warning


def test_a_record_from_another_machine_replaces_the_saved_one_whole(tmp_path):
    path, said = tmp_path / "race.json", []
    first = {"hybrid": entry(2.1, 5000), "attention": entry(2.2, 10000)}
    race.save_record({**record(240, 1e-3, first), "machine": "CPU one"}, path)
    again = {**record(240, 1e-3, {"hybrid": entry(2.0, 7000)}), "machine": "CPU two"}
    (saved,) = race.save_record(again, path, echo=said.append)
    # the attention entry was timed on CPU one: not comparable with a hybrid timed on CPU two
    assert set(saved["entries"]) == {"hybrid"} and saved["machine"] == "CPU two"
    assert len(said) == 1 and "on another machine (CPU one)" in said[0] and "attention" in said[0]


def test_a_record_raced_in_another_schedule_replaces_the_saved_one_whole(tmp_path):
    path, said = tmp_path / "race.json", []
    one_by_one = record(240, 1e-3, {"hybrid": entry(2.1, 5000), "attention": entry(2.2, 10000)})
    one_by_one["settings"]["turn_seconds"] = 0.0
    race.save_record(one_by_one, path)
    in_turns = record(240, 1e-3, {"hybrid": entry(2.0, 7000)})  # the default: turns of 10 s
    (saved,) = race.save_record(in_turns, path, echo=said.append)
    # entries raced one after another are not mixed into a record of entries that took turns
    assert set(saved["entries"]) == {"hybrid"} and saved["settings"]["turn_seconds"] == 10.0
    assert len(said) == 1 and "one after another" in said[0] and "attention" in said[0]
    # the same machine and schedule: a subset run updates its entries, keeps the others
    more = record(240, 1e-3, {"mamba": entry(2.05, 6000), "attention": entry(2.1, 9000)})
    (merged,) = race.save_record(more, path)
    assert set(merged["entries"]) == {"hybrid", "mamba", "attention"}


def test_a_single_entry_is_not_added_to_a_record_whose_entries_took_turns(tmp_path):
    path, said = tmp_path / "race.json", []
    in_turns = record(240, 1e-3, {"hybrid": entry(2.1, 5000), "attention": entry(2.2, 10000)})
    race.save_record(in_turns, path)
    alone = {**record(240, 1e-3, {"llama": entry(2.0, 12000)}), "date": "2000-01-02"}
    records = race.save_record(alone, path, echo=said.append)
    # it trained with no process beside it: faster than among the others, so the file stays as it was
    assert not race.saved(alone, records) and race.saved(in_turns, records)
    assert race.load_records(path) == records and set(records[0]["entries"]) == {"hybrid", "attention"}
    assert len(said) == 1 and "not saved: llama trained alone" in said[0]
    assert "(e.g. llama attention)" in said[0]
    # replacing the only entry of a record, or a first record of its settings, is not adding one
    lone = record(240, 3e-3, {"llama": entry(2.0, 12000)})
    assert race.saved(lone, race.save_record(lone, path))
    lone_again = {**lone, "date": "2000-01-03"}
    assert race.saved(lone_again, race.save_record(lone_again, path))
    # one after another (--turn-seconds 0) every entry ran alone: nothing to refuse
    sequential = record(120, 1e-3, {"hybrid": entry(2.1, 5000), "attention": entry(2.2, 10000)})
    sequential["settings"]["turn_seconds"] = 0.0
    race.save_record(sequential, path)
    one = {**record(120, 1e-3, {"llama": entry(2.0, 12000)}), "date": "2000-01-04"}
    one["settings"]["turn_seconds"] = 0.0
    assert race.saved(one, race.save_record(one, path))


def test_the_design_raced_is_the_preset_layer_plan_with_its_attention():
    design = race.current_design()
    assert design == race.layer_plan(race.preset_config())
    assert design.startswith("A-M*-A-M* (* no FFN), attention with QK-norm + output gate")
    plain = race.preset_config().replaced(attention_qk_norm=False, attention_output_gate=False)
    assert "attention with" not in race.layer_plan(plain)  # plain attention is not named
    qk_only = race.layer_plan(plain.replaced(attention_qk_norm=True))
    assert "attention with QK-norm," in qk_only and "gate" not in qk_only
    # an old record names its design through the hybrid entry's sizes, a new one at the top
    assert race.hybrid_design(record(240, 1e-3, {"hybrid": entry(2.0, 1.0)})) == "s"
    assert race.hybrid_design({**record(240, 1e-3, {}), "design": "d"}) == "d"
    assert race.hybrid_design(record(240, 1e-3, {"mamba": entry(2.0, 1.0)})) is None
    # today's tiny only when the record names today's plan; one that cannot tell is earlier
    assert race.raced_today({**record(240, 1e-3, {}), "design": design})
    assert not race.raced_today(record(240, 1e-3, {"hybrid": entry(2.0, 1.0)}))
    assert not race.raced_today(record(240, 1e-3, {"mamba": entry(2.0, 1.0)}))


def test_the_readme_headline_says_when_its_record_raced_an_earlier_tiny():
    entries = {"hybrid": entry(2.1, 5000), "mamba": entry(2.2, 4000)}
    today = {**record(240, 1e-3, entries), "design": race.current_design()}
    assert race._headline_race({"records": [today]}) == "2.100 vs 2.200 (mamba)"
    earlier = record(240, 1e-3, entries)  # its hybrid's sizes: "s", not today's plan
    assert race._headline_race({"records": [earlier]}) == "2.100 vs 2.200 (mamba; an earlier `tiny`)"
    assert race._headline_race({"records": [today]}, "python-code") is None  # no such record


def test_a_record_of_another_tiny_replaces_the_saved_one_whole(tmp_path):
    path, said = tmp_path / "race.json", []
    earlier = {"hybrid": {**entry(2.2, 5000), "sizes": "A-M-A-M"}, "llama": entry(2.3, 9000)}
    race.save_record(record(240, 1e-3, earlier), path)
    now = {**record(240, 1e-3, {"hybrid": {**entry(2.1, 5000), "sizes": "A-M-A-M, gated"}}),
           "design": "A-M-A-M, gated"}  # fmt: skip
    (saved,) = race.save_record(now, path, echo=said.append)
    # Llama was sized to the earlier tiny's twin and raced beside the earlier hybrid: dropped
    assert set(saved["entries"]) == {"hybrid"} and saved["design"] == "A-M-A-M, gated"
    assert len(said) == 1 and "for another tiny (hybrid A-M-A-M)" in said[0] and "llama" in said[0]
    # seeds of one setting are summarised together only when they raced the same tiny
    again = {**now, "settings": {**now["settings"], "seed": 1}}
    other = {**record(240, 1e-3, earlier), "settings": {**now["settings"], "seed": 2}}
    groups = race.seed_groups([saved, again, other])
    assert [[r["settings"]["seed"] for r in g] for g in groups] == [[0, 1]]
    assert "Hybrid: A-M-A-M, gated." in race.across_seeds(groups[0])


def test_seeds_of_one_setting_are_summarised_together():
    def seeded(seed, entries):
        r = record(240, 1e-3, entries)
        r["settings"]["seed"] = seed
        return r

    records = [
        seeded(0, {"hybrid": entry(2.0, 8000), "mamba": entry(2.1, 7000), "attention": entry(2.2, 7500)}),
        seeded(1, {"hybrid": entry(2.2, 8200), "mamba": entry(2.1, 7100), "attention": entry(2.3, 7400)}),
        seeded(2, {"hybrid": entry(2.0, 7800), "mamba": entry(2.05, 6900)}),
        record(120, 1e-3, {"hybrid": entry(2.5, 8000)}),  # another setting, one seed: no summary
    ]  # fmt: skip
    groups = race.seed_groups(records)
    assert [[r["settings"]["seed"] for r in g] for g in groups] == [[0, 1, 2]]
    text = race.across_seeds(groups[0])
    assert text.startswith("### Across seeds 0, 1, 2: 240 s per entry · lr 0.001 · batch 16 × 128")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "entry" not in line]
    # sorted by mean bpc: hybrid 2.067, mamba 2.083, attention 2.250 (sd of 2.0, 2.2, 2.0 = 0.115)
    assert [row.split("|")[1].strip() for row in rows] == ["hybrid", "mamba", "attention"]
    assert rows[0] == "| hybrid | 0, 1, 2 | 2.067 ± 0.115 | 8,000 ± 200 | – |"
    assert rows[1].endswith("| 2 of 3 |")  # hybrid lower in seeds 0 and 2, higher in seed 1
    assert rows[2].startswith("| attention | 0, 1 |") and rows[2].endswith("| 2 of 2 |")
    assert "Across seeds" in race.markdown(records)
    assert race.seed_groups(records[3:]) == []


def test_a_busy_cpu_is_flagged():
    quiet = {**record(240, 1e-3, {"attention": {**entry(2.0, 1e4), "load_average": 2.2}}),
             "cores": 2}  # fmt: skip
    assert race.load_warning(quiet) == ""
    busy = {**quiet, "entries": {"attention": {**entry(2.0, 1e4), "load_average": 3.8}}}
    assert "load average reached 3.8 on 2 cores" in race.record_markdown(busy)


def test_command_line_settings():
    quick = race.settings_from_args(race.parse_args(["--quick"]))
    assert (quick.seconds, quick.eval_blocks) == (race.QUICK_SECONDS, race.QUICK_EVAL_BLOCKS)
    args = race.parse_args(["--seconds", "120", "--lr", "3e-3", "--models", "hybrid", "gpt2"])
    settings = race.settings_from_args(args)
    assert (settings.seconds, settings.lr, settings.eval_blocks) == (120.0, 3e-3, None)
    assert args.models == ["hybrid", "gpt2"]
    assert race.RaceSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seconds", "0"], "--seconds must be finite and > 0, not 0.0"),
        (["--seconds", "inf"], "--seconds must be finite and > 0, not inf"),
        (["--lr=-1e-3"], "--lr must be finite and > 0, not -0.001"),
        (["--batch-size", "0"], "--batch-size must be ≥ 1, not 0"),
        (["--seq-len", "0"], "--seq-len must be ≥ 1, not 0"),
        (["--threads", "0"], "--threads must be ≥ 1, not 0"),
        (["--turn-seconds", "-1"], "--turn-seconds must be finite and ≥ 0, not -1.0"),
    ],
)
def test_a_setting_no_race_can_run_ends_the_command_with_its_reason(flags, message, monkeypatch):
    monkeypatch.setattr(race, "run", lambda *a, **k: pytest.fail("raced with a refused setting"))
    with pytest.raises(SystemExit) as stop:
        race.main(flags)
    assert str(stop.value).startswith(f"python -m bench.race: error: {message} (")
    with pytest.raises(ValueError, match="--eval-blocks must be ≥ 1 or None"):
        race.RaceSettings(eval_blocks=0)


def test_a_setting_label_names_everything_that_tells_two_races_apart():
    # two saved 240 s seed-0 races differed only in their batch shape (16 × 128 and 4 × 512):
    # the label (RESULTS.md headings, the README headline, chapter 16c) must name it
    settings = race.RaceSettings(batch_size=4, seq_len=512, seed=2).to_dict()
    assert race.setting_label(settings) == "240 s per entry · lr 0.001 · batch 4 × 512 · seed 2"
    assert race.setting_label(settings, ", ", seed=False) == "240 s per entry, lr 0.001, batch 4 × 512"


def test_races_on_two_corpora_are_kept_and_labelled_apart(tmp_path):
    path = tmp_path / "race.json"
    code = {**record(240, 1e-3, {"hybrid": entry(1.6, 9000)}), "corpus": "python-code"}
    code["validation"]["works"] = [f"module{i}.py.txt" for i in range(43)]
    race.save_record(record(240, 1e-3, {"hybrid": entry(2.2, 9000)}), path)
    race.save_record(code, path)  # same settings, another corpus: a record of its own
    records = race.load_records(path)
    assert [(r["corpus"], r["entries"]["hybrid"]["val_bpc"]) for r in records] == [
        ("python-code", 1.6), ("shakespeare", 2.2)
    ]  # fmt: skip
    text = race.record_markdown(records[0])
    assert text.startswith("### python-code corpus · 240 s per entry · lr 0.001 · batch 16 × 128")
    # 43 held-out modules are counted, not listed (race.json lists them)
    assert "Validation: 43 held-out documents (module0.py.txt, module1.py.txt, …)" in text
    assert race.record_markdown(records[1]).startswith("### 240 s per entry")
    second_seed = {**code, "settings": {**code["settings"], "seed": 1}}
    groups = race.seed_groups([*records, second_seed])  # seeds group within one corpus only
    assert [[r["corpus"] for r in group] for group in groups] == [["python-code"] * 2]
    assert race.across_seeds(groups[0]).startswith("### Across seeds 0, 1: python-code corpus")
    assert race.data_dir_for("shakespeare") == race.DATA_DIR
    assert race.data_dir_for("python-code").name == "race_data_python-code"
    assert race.parse_args(["--corpus", "python-code"]).corpus == "python-code"


def test_a_corpus_can_hold_out_more_documents(race_data, monkeypatch, tmp_path):
    corpus, _, _, works = race_data
    assert len(works) == race.VALIDATION_WORKS
    monkeypatch.setitem(race.HELD_OUT, corpus, 3)
    data, works = race.prepare_race_data(corpus, tmp_path / "data")
    assert len(works) == 3 and len(set(works)) == 3


def test_the_table_counts_epochs_of_the_training_split():
    saved = record(960, 1e-3, {"mamba": entry(2.1, 10000), "hybrid": entry(2.0, 12000)})
    saved["entries"]["hybrid"]["tokens"] = 50_000
    assert "epochs" not in race.record_markdown(saved)  # a record without the split's size
    saved["train_tokens"] = 20_000
    text = race.record_markdown(saved)
    assert "Training split: 20,000 tokens." in text
    header, rule, first, second = [line for line in text.splitlines() if line.startswith("|")]
    assert header.count("|") == rule.count("|") == first.count("|") == 11
    assert "| epochs |" in header
    # 50,000 and 20,480 tokens trained on, over 20,000: 2.5 and 1.0 (rounded) epochs
    assert first.startswith("| 1 | hybrid |") and "| 12,000 | 2.5 | 5.000 | 2.000 |" in first
    assert "| 10,000 | 1.0 | 5.000 | 2.100 |" in second
    failed = race._table({"gpt2": {"error": "boom"}}, train_tokens=20_000)[-1]
    assert failed.count("|") == 11


def test_freed_memory_setting_reaches_the_record_and_its_table(tmp_path):
    # the default keeps freed memory in every worker; --return-freed-memory gives it back
    kept = race.settings_from_args(race.parse_args([]))
    returned = race.settings_from_args(race.parse_args(["--return-freed-memory"]))
    assert kept.reuse_freed_memory and not returned.reuse_freed_memory
    # a record saved before the setting existed ran without it
    old = race.RaceSettings().to_dict()
    del old["reuse_freed_memory"]
    assert race.RaceSettings.from_dict(old).reuse_freed_memory is False
    assert race.process_text(kept.to_dict()) == "2 threads, freed memory kept for reuse"
    assert race.process_text(old) == "2 threads"
    # entries timed with the other setting are not mixed into the new record
    path, said = tmp_path / "race.json", []
    before = record(240, 1e-3, {"hybrid": entry(2.1, 5000), "attention": entry(2.2, 10000)})
    before["settings"] = {**before["settings"], "reuse_freed_memory": False}
    race.save_record(before, path)
    now = record(240, 1e-3, {"hybrid": entry(2.0, 7000)})
    now["settings"] = {**now["settings"], "reuse_freed_memory": True}
    (saved,) = race.save_record(now, path, echo=said.append)
    assert set(saved["entries"]) == {"hybrid"}
    assert len(said) == 1 and "freed memory returned to the system" in said[0]
    assert "2 threads, freed memory kept for reuse, entries trained" in race.record_markdown(saved)
