"""The fine-tuning script: resumes exactly, LoRA trains only adapters and merges back, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minifusion.checkpoint import export_pretrained
from minifusion.config import MiniFusionConfig
from minifusion.finetune import add_lora, main, trainable_parameters
from minifusion.model import MiniFusionForCausalLM
from minifusion.tokenizer import train_tokenizer
from tests.conftest import write_plays

pytest.importorskip("peft", reason="peft is in the finetune extra (pip install -e '.[finetune]')")


def _small_model(vocab_size: int) -> MiniFusionForCausalLM:
    torch.manual_seed(0)
    config = MiniFusionConfig.from_preset("tiny", vocab_size=vocab_size, hidden_size=32,
                                          num_hidden_layers=2, mixer_types=["attention", "mamba"],
                                          ffn_types=["dense", "none"], intermediate_size=64,
                                          global_attention_layers=[0])  # fmt: skip
    return MiniFusionForCausalLM(config)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small base model saved with a tokenizer trained on six generated plays."""
    root = tmp_path_factory.mktemp("finetune")
    plays = write_plays(root / "plays", plays=6, turns=60)
    tokenizer = train_tokenizer([p.read_text() for p in plays.glob("*.txt")], vocab_size=300)
    export_pretrained(_small_model(len(tokenizer)), tokenizer, root / "base")
    return root


def _finetune(base, out, *extra):
    return main(["--base", str(base / "base"), "--out", str(out), "--corpus",
                 str(base / "plays" / "*.txt"), "--val-fraction", "0.34", "--test-per-task", "8",
                 "--steps", "6", "--batch-size", "4", "--no-progress", *extra])  # fmt: skip


def _train_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_interrupted_fine_tuning_resumes_to_the_same_result(base, tmp_path, capsys, lora):
    extra = ["--lora", "--lora-rank", "2"] if lora else []
    assert _finetune(base, tmp_path / "straight", *extra) == 0
    assert _finetune(base, tmp_path / "resumed", *extra, "--stop-at", "3") == 0
    assert not (tmp_path / "resumed" / "model").exists()  # paused, not finished
    assert _finetune(base, tmp_path / "resumed", *extra) == 0
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    straight_losses = dict(_train_losses(tmp_path / "straight"))
    assert dict(_train_losses(tmp_path / "resumed"))[6] == straight_losses[6]  # exact floats
    scores = json.loads((tmp_path / "resumed" / "eval.json").read_text())
    assert set(scores) == {"tasks", "lora", "base", "finetuned"} and scores["lora"] == lora
    assert 0 <= scores["finetuned"]["all"] <= 1
    # the run resumes only as itself: not with LoRA switched, not on other tasks
    switched = [] if lora else ["--lora"]
    for flags, named in ((switched, "--lora"), ([*extra, "--tasks", "who_said"], "--tasks")):
        assert _finetune(base, tmp_path / "resumed", *flags) == 1
        error = capsys.readouterr().err
        assert f"({named}). Rerun with the run's own settings" in error and "--fresh" in error
    assert (tmp_path / "resumed" / "adapter" / "adapter_config.json").is_file() == lora
    tokenizer_config = json.loads(
        (tmp_path / "resumed" / "model" / "tokenizer_config.json").read_text()
    )
    assert "### Answer" in (tokenizer_config.get("chat_template") or
                            (tmp_path / "resumed" / "model" / "chat_template.jinja").read_text())  # fmt: skip


def test_lora_trains_rank_times_in_plus_out_per_target_and_merges_to_the_same_model():
    model = _small_model(300).eval()
    gains = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    with_norms, _ = trainable_parameters(add_lora(_small_model(300), rank=4, targets=["q_proj"]))
    wrapped = add_lora(model, rank=4, targets=["q_proj", "in_proj"], train_norms=False)
    trainable, total = trainable_parameters(wrapped)
    attention, mamba = model.model.layers[0].attn, model.model.layers[1].mamba
    assert with_norms == 4 * (32 + 32) + gains  # q_proj is 32 → 32 here
    expected = sum(4 * (layer.in_features + layer.out_features)
                   for layer in (attention.q_proj.base_layer, mamba.in_proj.base_layer))  # fmt: skip
    assert trainable == expected
    for name, parameter in wrapped.named_parameters():  # B starts at zero: no change at first
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
        merged = wrapped.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


def test_bad_targets_and_missing_base_are_named(base, tmp_path, capsys):
    with pytest.raises(ValueError, match="not linear layers of this model"):
        add_lora(_small_model(300), targets=["query"])
    assert main(["--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert _finetune(base, tmp_path / "o", "--tasks", "who_said,rhymes") == 1
    assert "Unknown task(s) ['rhymes']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-rank", "4"], "shape LoRA adapters: add --lora to train adapters"),
        (["--lora", "--lora-rank", "0"], "--lora-rank must be ≥ 1 (e.g. 16), not 0."),
        (["--lora", "--lora-alpha", "nan"], "--lora-alpha must be > 0 (e.g. 32), not nan."),
        (["--lora", "--lora-targets", ","], "--lora-targets names no layer"),
        (["--tasks", ","], "--tasks names no task: one or more of"),
        (["--steps", "0"], "--steps must be ≥ 1, not 0."),
        (["--test-per-task", "0"], "--test-per-task must be ≥ 1, not 0."),
        (["--val-fraction", "0"], "--val-fraction must be between 0 and 1, not 0.0: the held-out"),
        (["--val-fraction", "1"], "--val-fraction must be between 0 and 1, not 1.0"),
    ],
)
def test_flags_are_checked_before_the_base_model_is_loaded(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:  # the base does not exist: the flags come first
        main(["--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "a_file").write_text("not a run")
    with pytest.raises(SystemExit):
        main(["--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a_file")])
    assert "--out" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "not a run"
