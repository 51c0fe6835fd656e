"""lm-evaluation-harness scores a saved MiniFusion model through trust_remote_code on our tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lm_eval", reason="lm-eval is in the finetune extra (pip install -e '.[finetune]')"
)

from minifusion.checkpoint import export_pretrained  # noqa: E402
from minifusion.config import MiniFusionConfig  # noqa: E402
from minifusion.lm_eval_tasks import TASKS_DIR, plays  # noqa: E402
from minifusion.model import MiniFusionForCausalLM  # noqa: E402


def test_next_line_docs_hold_the_true_line_once_among_four():
    docs = plays.next_line()["test"]
    assert len(docs) == 500
    for doc in docs.select(range(50)):
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert 0 <= doc["answer"] < 4
        assert doc["context"].endswith(":")
    # the true line sits at every place, not always the first
    assert len({doc["answer"] for doc in docs}) == 4
    assert set(docs["play"]) <= {
        "coriolanus_gut.txt",
        "loves_labours_lost_gut.txt",
        "passionate_pilgrim_gut.txt",
        "romeo_and_juliet_gut.txt",
    }


def test_instruction_docs_come_from_held_out_plays_and_render_in_the_chat_format():
    docs = plays.who_said()["test"]
    assert len(docs) == plays.TEST_PER_TASK
    prompt = plays.chat_prompt(docs[0])
    assert prompt.startswith("### Question\n") and prompt.endswith("\n### Answer\n")
    assert docs[0]["answer"] + ":" in docs[0]["prompt"]  # the answer is a speaker of the context


@pytest.mark.slow
def test_lm_eval_runs_our_tasks_on_an_export(tmp_path, small_tokenizer):
    tokenizer = small_tokenizer
    torch.manual_seed(0)
    config = MiniFusionConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=64,
                                          intermediate_size=128)  # fmt: skip
    export_pretrained(MiniFusionForCausalLM(config), tokenizer, tmp_path / "model")
    env = {**os.environ, "MINIFUSION_FUSED_SCAN": "0", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={tmp_path / 'model'},trust_remote_code=True",
        "--tasks", "minifusion_next_line,minifusion_who_said", "--include_path", str(TASKS_DIR),
        "--limit", "8", "--device", "cpu", "--batch_size", "4",
        "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list((tmp_path / "results").rglob("results_*.json"))
    scores = json.loads(Path(path).read_text())["results"]
    assert 0 <= scores["minifusion_next_line"]["acc,none"] <= 1
    assert 0 <= scores["minifusion_who_said"]["exact_match,none"] <= 1
