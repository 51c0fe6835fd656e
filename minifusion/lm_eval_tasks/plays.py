"""Datasets for the YAML tasks of this folder (lm-eval's ``custom_dataset: !function``)."""

from __future__ import annotations

import random

from datasets import Dataset

from minifusion.data import load_documents, split_documents
from minifusion.instruct import CHAT_TEMPLATE, CONTEXT_TURNS, build_examples, play_turns

CHOICES = 4
# The split of configs/tiny.yaml's data section: the plays `make train` never saw.
VAL_FRACTION, SPLIT_SEED = 0.1, 0
TEST_PER_TASK = 200


def _held_out_plays(**_):
    return split_documents(load_documents("shakespeare"), VAL_FRACTION, SPLIT_SEED)[1]


def next_line(**metadata) -> dict[str, Dataset]:
    """Four turns, then four candidate next lines (the true one at a random place)."""
    rng = random.Random(0)
    rows = []
    for play in _held_out_plays():
        turns = play_turns(play["text"])
        for start in range(0, len(turns) - CONTEXT_TURNS, CONTEXT_TURNS + 1):
            window, following = turns[start : start + CONTEXT_TURNS], turns[start + CONTEXT_TURNS]
            others = sorted({t.line for t in turns} - {following.line})
            choices = rng.sample(others, CHOICES - 1)
            answer = rng.randrange(CHOICES)
            choices.insert(answer, following.line)
            context = "\n".join(f"{t.speaker}: {t.line}" for t in window)
            rows.append({"context": f"{context}\n{following.speaker}:", "choices": choices,
                         "answer": answer, "play": play["source"]})  # fmt: skip
    rng.shuffle(rows)
    return {"test": Dataset.from_list(rows[: metadata.get("limit_docs", 500)])}


def _instruction_task(task: str) -> dict[str, Dataset]:
    examples = build_examples(_held_out_plays(), seed=1, max_per_task=TEST_PER_TASK)
    rows = [{"prompt": e.prompt, "answer": e.answer, "play": e.play}
            for e in examples if e.task == task]  # fmt: skip
    return {"test": Dataset.from_list(rows)}


def next_speaker(**_) -> dict[str, Dataset]:
    return _instruction_task("next_speaker")


def is_question(**_) -> dict[str, Dataset]:
    return _instruction_task("is_question")


def who_said(**_) -> dict[str, Dataset]:
    return _instruction_task("who_said")


def chat_prompt(doc: dict) -> str:
    """The question as chapter 17's chat template renders it, ready for the answer."""
    assert CHAT_TEMPLATE.startswith("{% for message in messages %}")  # the format below
    return f"### Question\n{doc['prompt']}\n### Answer\n"
