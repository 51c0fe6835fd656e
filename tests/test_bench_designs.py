"""bench/designs.py: every design is a valid preset change, a design race applies its settings in
the worker process, records render ranked against the attention twin. No test looks at a speed."""

from __future__ import annotations

import math

import pytest

from bench import designs, race
from minifusion.config import MiniFusionConfig
from tests.conftest import write_words_corpus
from tests.test_bench_race import entry, record


@pytest.mark.parametrize("name", list(designs.DESIGNS))
def test_every_design_is_a_valid_change_of_the_preset(name):
    overrides = designs.design_overrides(name)
    config = race.preset_config().replaced(**overrides)
    assert isinstance(config, MiniFusionConfig)
    assert len(config.mixer_types) == config.num_hidden_layers
    preset = race.preset_config()
    assert (config == preset) == (name == "tiny")  # every other design changes something
    design = designs.DESIGNS[name]
    heads = preset.global_attention_layers if design.preset_global_heads else None
    assert config.global_attention_layers == heads  # global heads everywhere unless kept
    if design.preset_attention:
        assert (config.attention_qk_norm, config.attention_output_gate) == (
            preset.attention_qk_norm, preset.attention_output_gate)
    else:  # plain attention, as the designs were raced, unless the design itself asks for more
        for key, value in designs.PLAIN_ATTENTION.items():
            assert getattr(config, key) == design.overrides.get(key, value)


def test_plain_attention_tiny_is_the_preset_without_qk_norm_and_gate():
    preset = race.preset_config()
    assert preset.attention_qk_norm and preset.attention_output_gate  # what the preset ships
    plain = preset.replaced(**designs.design_overrides("tiny-plain-attention"))
    assert plain == preset.replaced(attention_qk_norm=False, attention_output_gate=False)
    gate = preset.num_attention_heads * preset.head_dim * preset.hidden_size  # g_proj per layer
    norms = 2 * preset.head_dim  # the query and key gains per layer
    attention_layers = preset.mixer_types.count("attention")
    assert preset.estimate_parameters() - plain.estimate_parameters() == \
        attention_layers * (gate + norms)


def test_the_attention_design_is_the_race_twin_with_plain_attention():
    base = race.preset_config()
    attention = base.replaced(**designs.design_overrides("attention"))
    twin = race.minifusion_config("attention", base)
    assert attention == twin.replaced(**designs.PLAIN_ATTENTION)
    twin_count = race.entry_parameters(["attention"])["attention"]
    assert twin_count == twin.estimate_parameters() > attention.estimate_parameters()


def test_a_bad_design_fails_before_any_training(monkeypatch):
    bad = designs.Design("broken", "nobody", {"mixer_types": ["mamba"]})  # wrong layer count
    monkeypatch.setitem(designs.DESIGNS, "broken", bad)
    with pytest.raises(ValueError):
        designs.run(["broken"])


@pytest.mark.slow
def test_a_quick_design_race_applies_each_design_in_its_worker(tmp_path):
    corpus = str(write_words_corpus(tmp_path / "corpus") / "*.txt")
    settings = race.RaceSettings(seconds=1.0, batch_size=2, seq_len=32, eval_blocks=2)
    lines: list[str] = []
    result = designs.run(["mamba", "interleaved-AMAM"], settings, corpus=corpus,
                         data_dir=tmp_path / "data", echo=lines.append)  # fmt: skip
    base = race.preset_config()
    for name in ("mamba", "interleaved-AMAM"):
        r = result["entries"][name]
        assert "error" not in r, r
        expected = base.replaced(**designs.design_overrides(name)).estimate_parameters()
        assert r["params"] == expected  # the worker built the design, not the preset
        assert r["lineage"] == designs.DESIGNS[name].lineage and math.isfinite(r["val_bpc"])
    assert len(lines) == 3 and all(line.startswith("[designs]") for line in lines)
    assert result["corpus"] == corpus and result["train_tokens"] > 0  # kept apart from Shakespeare


def test_records_render_against_the_twin(tmp_path):
    def design(bpc: float, speed: float, name: str) -> dict:
        return {**entry(bpc, speed), "design": designs.DESIGNS[name].description,
                "lineage": designs.DESIGNS[name].lineage}  # fmt: skip

    entries = {"attention": design(2.30, 8000, "attention"),
               "interleaved-AMAM": design(2.25, 6000, "interleaved-AMAM"),
               "mamba": {"error": "RuntimeError: boom"}}  # fmt: skip
    path = tmp_path / "designs.json"
    saved = designs.save_record(record(240, 1e-3, entries), path)
    assert '"benchmark": "designs"' in path.read_text() and len(saved) == 1
    text = designs.markdown(race.load_records(path))
    assert "| 1 | interleaved-AMAM: layers A-M-A-M, Mamba expand 2 | Jamba / Samba |" in text
    assert "| 6,000 (0.75×) | 2.250 (-0.050) |" in text
    assert text.index("| 2 | attention:") < text.index("| – | mamba | failed: RuntimeError: boom")
    assert designs.markdown([]).startswith("No design race saved yet")
    assert text.startswith("### 240 s per design · lr 0.001 · batch 16 × 128 · seed 0")


def test_a_design_race_on_another_corpus_is_its_own_record(tmp_path):
    path = tmp_path / "designs.json"
    entries = {"attention": {**entry(2.3, 8000), "design": "d", "lineage": "l"}}
    designs.save_record(record(240, 1e-3, entries), path)
    saved = designs.save_record({**record(240, 1e-3, entries), "corpus": "python-code"}, path)
    assert [r.get("corpus") for r in saved] == ["python-code", race.CORPUS]
    assert designs.record_markdown(saved[0]).startswith(
        "### python-code corpus · 240 s per design · lr 0.001")


def test_command_line():
    args = designs.parse_args(["--designs", "attention", "mamba", "--seconds", "60"])
    assert args.designs == ["attention", "mamba"] and args.seconds == 60.0
    assert args.corpus == race.CORPUS
    assert designs.parse_args(["--corpus", "python-code"]).corpus == "python-code"
    with pytest.raises(SystemExit):
        designs.parse_args(["--designs", "no-such-design"])
