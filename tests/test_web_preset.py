"""The streamed web-corpus preset (configs/fineweb-edu-250m.yaml), checked offline.

Its settings validate and `--dry-run` plans it without the network; its data section, pointed
at local files, prepares a stream the way the trainer does; `--dry-run`'s tokens/s estimate
follows the FLOPs count it states.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minifusion.config import MiniFusionConfig
from minifusion.data import PreparedStream, StreamingBlocks, TokenFile, preparation_for
from minifusion.settings import load_settings
from minifusion.tokenizer import document_encoder, load_tokenizer
from minifusion.train import main, training_flops_per_token
from minifusion.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "fineweb-edu-250m.yaml"

# Runs minifusion.train as __main__ in a process where opening a connection raises.
NO_NETWORK = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("--dry-run tried to use the network")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
sys.argv = ["minifusion.train", *sys.argv[1:]]
runpy.run_module("minifusion.train", run_name="__main__")
"""


def test_the_preset_validates_and_says_what_its_comments_say():
    settings = load_settings(PRESET)
    model = MiniFusionConfig.from_section(settings["model"], where=str(PRESET))  # no weights
    assert MiniFusionConfig.from_yaml(PRESET).to_dict() == model.to_dict()
    train = TrainConfig.from_dict(settings["train"])
    data = settings["data"]
    assert data["source"] == "hf:HuggingFaceFW/fineweb-edu:sample-10BT"
    assert data["streaming"] and data["text_field"] == "text"
    prepare = preparation_for(data, model.vocab_size)
    assert prepare.func.__name__ == "prepare_streaming_data"
    assert (prepare.keywords["val_documents"], prepare.keywords["tokenizer_documents"]) == (
        1000,
        50000,
    )
    # One GPU's size; GPT-3 Medium's shape and batch; ~20 tokens per parameter; warm-up 375M.
    parameters = model.estimate_parameters()
    assert 200e6 < parameters < 300e6
    assert (model.hidden_size, model.num_hidden_layers, model.head_dim) == (1024, 24, 64)
    assert train.block_size == data["block_size"] == 2048 <= model.max_position_embeddings
    assert train.tokens_per_step == 524_288 and not train.gradient_checkpointing
    assert 19 < train.tokens_per_step * train.max_steps / parameters < 23
    assert train.warmup_steps * train.tokens_per_step == pytest.approx(375e6, rel=0.01)


@pytest.mark.slow
def test_dry_run_plans_the_preset_without_the_network(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))  # fmt: skip
    result = subprocess.run([sys.executable, "-c", NO_NETWORK, "--config", str(PRESET),
                             "--out", str(out), "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert "8 sequences × 2,048 tokens × 32 accumulation × 1 GPU(s) = 524,288 tokens" in printed
    assert "no DeepSpeed (plain loop, ZeRO-0 figures) on 1 GPU(s)" in printed
    total = float(re.search(r"#   total +([\d.]+) GiB", printed).group(1))
    assert 8 < total < 40  # fits one 40 GB GPU, with the 10–20 % headroom the line asks for
    assert "tokens/s per GPU at 40 % MFU on a 312-TFLOPS GPU" in printed
    assert not out.exists()  # nothing written


def _estimate(capsys, *extra: str) -> float:
    code = main(["--config", str(PRESET), "--out", "unused", "--dry-run", *extra])
    printed = capsys.readouterr().out
    assert code == 0
    return float(re.search(r"expected ≈ ([\d,]+) tokens/s per GPU", printed)[1].replace(",", ""))


def test_dry_run_estimates_tokens_per_second_from_flops(capsys):
    config = MiniFusionConfig.from_yaml(PRESET)
    forward = config.estimate_flops_per_token(2048)
    plain = _estimate(capsys, "--peak-tflops", "989", "--mfu", "0.5")
    assert plain == pytest.approx(0.5 * 989e12 / (3 * forward), abs=1)
    assert _estimate(capsys) == pytest.approx(0.4 * 312e12 / (3 * forward), abs=1)  # defaults
    # Whole-layer checkpointing recomputes every layer's forward pass (not the LM head's).
    layers = forward - config.flops_breakdown(2048)["lm_head"]
    checkpointed = _estimate(capsys, "--peak-tflops", "989", "--mfu", "0.5",
                             "--set", "train.gradient_checkpointing=true")  # fmt: skip
    assert checkpointed == pytest.approx(plain * 3 * forward / (3 * forward + layers), abs=1)
    assert 3 / 4 < checkpointed / plain < 4 / 5
    assert training_flops_per_token(config, 2048, True) == 3 * forward + layers
    assert main(["--config", str(PRESET), "--out", "unused", "--dry-run", "--mfu", "0"]) == 1
    assert "--mfu in (0, 1]" in capsys.readouterr().err


def test_the_preset_data_section_streams_local_files(tmp_path):
    """The preset's data settings (source swapped for local JSONL files), prepared as the
    trainer prepares them: validation = the first documents, training = the rest."""
    rng = random.Random(0)  # numbers, so that the pages hold several blocks of tokens
    pages = [
        f"Page {i}: " + " ".join(str(rng.randrange(10**6)) for _ in range(400)) for i in range(9)
    ]
    pages[0] += " zqxjvk" * 50  # a word only the first (validation) page holds
    folder = tmp_path / "corpus"
    folder.mkdir()
    for part, chunk in enumerate((pages[:5], pages[5:])):
        lines = [json.dumps({"id": i, "text": text}) for i, text in enumerate(chunk)]
        (folder / f"part{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = load_settings(PRESET, [f"data.source={folder}/*.jsonl", "data.val_documents=3",
                                      "data.tokenizer_documents=4"])  # fmt: skip
    vocab_size = MiniFusionConfig.from_yaml(PRESET).vocab_size
    prepare = preparation_for(settings["data"], vocab_size)
    prepared = prepare(tmp_path / "run", progress=False)
    assert isinstance(prepared, PreparedStream)

    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    encoder, eos = document_encoder(tokenizer), tokenizer.eos_token_id

    def ids(texts: list[str]) -> list[int]:
        return [t for text in texts for t in [*encoder.encode(text).ids, eos]]

    assert TokenFile(prepared.val_file).tokens.tolist() == ids(pages[:3])
    assert len(encoder.encode(" zqxjvk").ids) > 1  # validation text never reached the tokenizer
    assert [doc["text"] for doc in prepared.training_documents()] == pages[3:]

    block_size = settings["train"]["block_size"]  # the preset's 2,048
    blocks = list(StreamingBlocks(prepared.training_documents(), tokenizer, block_size))
    stream = torch.tensor(ids(pages[3:]))
    assert len(blocks) == (len(stream) - 1) // block_size >= 2
    for i, (x, y) in enumerate(blocks):
        assert x.shape == y.shape == (block_size,)
        assert torch.equal(x, stream[i * block_size : (i + 1) * block_size])
        assert torch.equal(y, stream[i * block_size + 1 : (i + 1) * block_size + 1])

    files = (prepared.val_file, prepared.tokenizer_dir / "tokenizer.json")
    made = {p: p.stat().st_mtime_ns for p in files}
    again = prepare(tmp_path / "run", progress=False)  # the same settings: reused, not redone
    assert again.val == prepared.val
    assert {p: p.stat().st_mtime_ns for p in made} == made
