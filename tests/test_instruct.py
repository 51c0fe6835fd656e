"""Instruction data: parsing plays into turns, the examples, the template, the masked batches."""

from __future__ import annotations

import torch

from minifusion.instruct import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    Example,
    InstructionBatches,
    InstructionValidation,
    build_examples,
    encode_example,
    exact_match,
    play_turns,
    with_chat_template,
)
from minifusion.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_DOCUMENTS

PLAY = """ROMEO AND JULIET

ACT I.

SCENE I. A public place.

[Enter Sampson and Gregory.]

Sampson.
Gregory, o' my word, we'll not carry coals.
No, for then we should be colliers.

Gregory.
[Aside.]
No, for then we should be colliers.

Lady  Montague.
Thou shalt not stir one foot to seek a foe that is in the street today here.

[They fight.]

Sampson.
Draw, if you be men.
"""


def test_play_turns_keep_speakers_and_first_lines_only():
    turns = play_turns(PLAY)
    assert [t.speaker for t in turns] == ["Sampson", "Gregory", "Lady Montague", "Sampson"]
    assert turns[0].line == "Gregory, o' my word, we'll not carry coals."
    assert turns[1].line == "No, for then we should be colliers."  # stage direction dropped
    assert len(turns[2].line.split()) == 12  # cut to twelve words
    assert play_turns("Shall I compare thee to a summer's day?\nThou art more lovely") == []


def _documents(turns_text: str, source: str = "p.txt"):
    return [{"text": turns_text, "source": source}]


def test_examples_are_answerable_from_their_context(tmp_path):
    from tests.conftest import write_plays

    folder = write_plays(tmp_path / "plays", plays=2, turns=60)
    docs = [{"text": p.read_text(), "source": p.name} for p in sorted(folder.glob("*.txt"))]
    lines = {t.line for doc in docs for t in play_turns(doc["text"])}
    examples = build_examples(docs, seed=0)
    assert {e.task for e in examples} == {"is_question", "last_word", "next_speaker", "who_said"}
    questions = [e for e in examples if e.task == "is_question"]
    assert sum(e.answer == "yes" for e in questions) * 2 == len(questions)  # balanced
    for example in questions:
        line = example.prompt.removeprefix('Is this a question? "')[:-1]
        endings = "?" if example.answer == "yes" else ".!"
        assert any(line + end in lines for end in endings)
    for example in (e for e in examples if e.task == "last_word"):
        start = example.prompt.removeprefix('Finish the line: "')[:-1]
        assert any(full.startswith(f"{start} {example.answer}") for full in lines)
    for example in (e for e in examples if e.task in ("next_speaker", "who_said")):
        context = example.prompt.split("\n")[:-1]
        assert len(context) == 4
        assert any(line.startswith(example.answer + ": ") for line in context)
        if example.task == "who_said":
            quote = example.prompt.split('Who says "')[1][:-2]
            assert f"{example.answer}: {quote}" in context
    assert build_examples(docs, seed=0) == examples  # reproducible
    capped = build_examples(docs, seed=0, max_per_task=3)
    assert sorted(e.task for e in capped) == sorted(
        ["is_question", "last_word", "next_speaker", "who_said"] * 3)  # fmt: skip


def _tokenizer():
    return with_chat_template(train_tokenizer(SAMPLE_DOCUMENTS * 3, vocab_size=400))


def test_labels_cover_the_answer_and_its_end_token_only():
    tokenizer = _tokenizer()
    example = Example("next_speaker", "Romeo: hello\nJuliet: hi\nWho speaks next?", "Romeo", "p")
    ids, labels = encode_example(tokenizer, example)
    assert len(ids) == len(labels)
    answer = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Romeo" + tokenizer.eos_token
    first = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert tokenizer.decode(ids[:first]).endswith("### Answer\n")
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_batches_are_right_padded_shifted_and_resumable():
    tokenizer = _tokenizer()
    examples = [Example("who_said", f"A: line {i}\nWho says?", "A" * (1 + i % 3), "p")
                for i in range(10)]  # fmt: skip
    stream = InstructionBatches(tokenizer, examples, batch_size=4, seed=3)
    batches = [stream.next_batch() for _ in range(5)]  # crosses an epoch (10 examples)
    again = InstructionBatches(tokenizer, examples, batch_size=4, seed=3, position=8)
    for expected in batches[2:]:
        got = again.next_batch()
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    inputs, targets = batches[0]
    for row in range(4):
        scored = (targets[row] != IGNORE_INDEX).nonzero().flatten()
        assert targets[row, scored[-1]] == tokenizer.eos_token_id  # the answer ends the row
        assert (targets[row, scored[-1] + 1 :] == IGNORE_INDEX).all()  # then only padding


class _Oracle(torch.nn.Module):
    """Predicts, at every position, the token that follows in the example it is shown (or,
    with ``wrong=True``, a token that never does) — the two ends of exact match."""

    def __init__(self, rows, vocab, wrong=False):
        super().__init__()
        self.rows, self.vocab, self.wrong = rows, vocab, wrong
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            full = next(ids for ids in self.rows if ids[: len(ids) - 1] == row[: len(ids) - 1])
            for t in range(len(full) - 1):
                logits[b, t, (full[t + 1] + self.wrong) % self.vocab] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_is_one_for_an_oracle_and_zero_for_an_off_by_one_model():
    tokenizer = _tokenizer()
    examples = [Example(task, f"X{i}: words here\nY{i}: more\nWho?", f"X{i}", "p")
                for i, task in enumerate(["next_speaker", "who_said"] * 3)]  # fmt: skip
    rows = [encode_example(tokenizer, e)[0] for e in examples]
    vocab = len(tokenizer)
    assert exact_match(_Oracle(rows, vocab), tokenizer, examples, batch_size=4) == {
        "all": 1.0, "next_speaker": 1.0, "who_said": 1.0}  # fmt: skip
    assert exact_match(_Oracle(rows, vocab, wrong=True), tokenizer, examples)["all"] == 0.0


def test_validation_counts_answer_characters_with_the_end_token():
    tokenizer = _tokenizer()
    examples = [
        Example("who_said", "A: hi\nWho?", "Abc", "p"),
        Example("who_said", "B: x\nWho?", "B", "p"),
    ]
    validation = InstructionValidation(tokenizer, examples)
    assert len(validation) == 2 and validation.indices(None) == [0, 1]
    assert validation.characters_of([0, 1]) == 4 + 2
