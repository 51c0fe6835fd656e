"""Chapter 17 — instruction data from the plays, a chat template, and answer-only batches.

A pretrained model continues text; an *instruction-tuned* one answers a question and stops.
Fine-tuning teaches that format with examples of (prompt, answer) pairs. Ours are built from
the corpus itself, reproducibly and held out by play, so "did fine-tuning help?" is asked of
plays the model has never seen in either stage:

* ``is_question`` — a line with its last punctuation mark removed: "Is this a question?",
  yes or no (as many of each, so chance is one half);
* ``last_word`` — a line without its last word: "Finish the line", the word;
* ``next_speaker`` — four turns of dialogue, then "Who speaks next?"; the answer is a name
  that appears in the four turns (people in a scene take turns, so this rewards reading the
  context).
* ``who_said`` — four turns, then 'Who says "…"?' quoting one of them; the answer is the
  speaker of that line (exact recall from the context: attention's strength, chapter 16).

Everything here is plain data plumbing: :func:`play_turns` parses a play into turns,
:func:`build_examples` makes the examples, :data:`CHAT_TEMPLATE` renders them (it is stored in
the tokenizer, so ``tokenizer.apply_chat_template`` works wherever the model goes),
:class:`InstructionBatches` and :class:`InstructionValidation` feed the pretraining loop with
the prompt's tokens labelled ``-100`` (``cross_entropy`` skips them), and :func:`exact_match`
scores greedy answers in one forward pass.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "TASKS",
    "Example",
    "InstructionBatches",
    "InstructionValidation",
    "Turn",
    "build_examples",
    "candidates",
    "choice_accuracy",
    "encode_example",
    "exact_match",
    "first_of_each_task",
    "play_turns",
    "split_by_play",
    "with_chat_template",
]

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: these positions add no loss
TASKS = ("is_question", "last_word", "next_speaker", "who_said")
_PUNCTUATION = ".,;:!?'\"-()"
_BALANCED = {"is_question"}  # tasks whose answers are kept half and half
CONTEXT_TURNS = 4
MAX_LINE_WORDS = 12

# Question and answer under plain-text headers: no new tokens, so the pretrained embedding
# table is used as it is. The answer ends with the end-of-text token, which is how the model
# learns to stop. ``add_generation_prompt`` ends the text where the answer should begin.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}### Question\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}### Answer\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Answer\n{% endif %}"
)

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,28}[A-Za-z]\.$")  # "Romeo.", "Lady  Montague."
_NOT_SPEAKERS = {"act", "scene", "prologue", "epilogue", "chorus", "finis", "the end", "exeunt",
                 "exit", "enter"}  # fmt: skip


@dataclass(frozen=True)
class Turn:
    """One speech: who speaks and the first line they say (at most 12 words)."""

    speaker: str
    line: str
    complete: bool = True  # False when the line was cut to 12 words


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user's message
    answer: str  # what the assistant should say
    play: str  # the source the turns come from


def _speaker_name(line: str) -> str | None:
    line = line.strip()
    if not _SPEAKER.match(line) or len(line.split()) > 4:
        return None
    name = " ".join(line[:-1].split())  # "Lady  Montague." → "Lady Montague"
    return (
        None if name.lower() in _NOT_SPEAKERS or name.split()[0].lower() in _NOT_SPEAKERS else name
    )


def play_turns(text: str) -> list[Turn]:
    """The turns of a play, in order: paragraphs whose first line is a speaker ("Romeo.")
    followed by speech. Stage directions (``[...]``) are dropped; the speech is cut to its
    first line of at most 12 words. Texts without speakers (the sonnets) give ``[]``."""
    turns = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if len(lines) < 2 or (speaker := _speaker_name(lines[0])) is None:
            continue
        spoken = [line for line in lines[1:] if line and not line.startswith("[")]
        if not spoken:
            continue
        words = spoken[0].split()
        turns.append(Turn(speaker, " ".join(words[:MAX_LINE_WORDS]), len(words) <= MAX_LINE_WORDS))
    return turns


def _context(turns: Sequence[Turn]) -> str:
    return "\n".join(f"{turn.speaker}: {turn.line}" for turn in turns)


def _examples_of_play(turns: list[Turn], play: str, rng: random.Random) -> list[Example]:
    examples = []
    k = CONTEXT_TURNS
    for turn in turns:
        words = turn.line.split()
        answer = words[-1].strip(_PUNCTUATION) if words else ""
        if turn.complete and len(words) >= 4 and answer.isalpha():
            examples.append(
                Example("last_word", f'Finish the line: "{" ".join(words[:-1])}"', answer, play)
            )
    usable = [t.line for t in turns if t.complete and len(t.line.split()) >= 3]
    questions = [line for line in usable if line.endswith("?")]
    statements = [line for line in usable if line[-1:] in ".!"]
    count = min(len(questions), len(statements))  # as many of each: chance is one half
    for line, answer in [(q, "yes") for q in rng.sample(questions, count)] + [
        (s, "no") for s in rng.sample(statements, count)
    ]:
        examples.append(Example("is_question", f'Is this a question? "{line[:-1]}"', answer, play))
    for start in range(0, len(turns) - k, k):  # windows that do not overlap
        window = turns[start : start + k]
        speakers = {turn.speaker for turn in window}
        if len(speakers) < 2:
            continue
        following = turns[start + k]
        if following.speaker in speakers:  # answerable from the context
            examples.append(
                Example(
                    "next_speaker", f"{_context(window)}\nWho speaks next?", following.speaker, play
                )  # fmt: skip
            )
        lines = [turn.line for turn in window]
        unique = [turn for turn in window if lines.count(turn.line) == 1 and len(turn.line) > 8]
        if unique:
            quoted = rng.choice(unique)
            examples.append(
                Example(
                    "who_said",
                    f'{_context(window)}\nWho says "{quoted.line}"?',
                    quoted.speaker,
                    play,
                )  # fmt: skip
            )
    return examples


def build_examples(
    documents: Iterable[dict], *, seed: int = 0, max_per_task: int | None = None
) -> list[Example]:
    """Examples of every task from ``documents`` (rows with ``text`` and ``source``), shuffled
    with ``seed``; ``max_per_task`` keeps the first that many of each task."""
    rng = random.Random(seed)
    examples = []
    for document in documents:
        examples += _examples_of_play(play_turns(document["text"]), document["source"], rng)
    rng.shuffle(examples)
    return examples if max_per_task is None else first_of_each_task(examples, max_per_task)


def first_of_each_task(examples: Sequence[Example], count: int) -> list[Example]:
    """The first ``count`` examples of every task, in their order; for ``is_question`` half of
    them with each answer, so that always answering one way still scores one half."""
    kept, counts = [], {}
    for example in examples:
        balanced = example.task in _BALANCED
        key = (example.task, example.answer) if balanced else example.task
        share = (count + (example.answer == "yes")) // 2 if balanced else count
        if counts.get(key, 0) < share:
            kept.append(example)
            counts[key] = counts.get(key, 0) + 1
    return kept


def split_by_play(documents, val_fraction: float = 0.1, seed: int = 0):
    """The pretraining split (:func:`minifusion.data.split_documents`): fine-tuning then tests
    on plays that neither stage trained on."""
    from .data import split_documents

    return split_documents(documents, val_fraction=val_fraction, seed=seed)


def with_chat_template(tokenizer):
    """``tokenizer`` with :data:`CHAT_TEMPLATE` set (saved with it by ``save_pretrained``)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example: labels equal the ids on the answer (and its
    end-of-text token) and are ``IGNORE_INDEX`` on the prompt."""
    user = [{"role": "user", "content": example.prompt}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)  # fmt: skip
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": example.answer}], tokenize=True, return_dict=False
    )
    if full[: len(prompt)] != prompt:  # the template must not merge tokens across the boundary
        raise ValueError(f"the chat template tokenises the prompt differently: {example.prompt!r}")
    return full, [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, targets)``, both ``(batch, longest − 1)``; targets are the next
    tokens' labels. Padding sits *after* every real token, and a causal model's outputs at a
    position depend only on the positions before it, so the pads change nothing that is scored
    and need no attention mask (the same holds for the Mamba scan, which runs left to right)."""
    length = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(rows):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(labels[1:])
    return inputs, targets


class InstructionBatches:
    """Training batches of instruction examples, resumable at any position.

    The interface of :class:`minifusion.training.BatchStream` (``next_batch()``, ``position``,
    ``epoch``): example ``k`` is the ``k mod n``-th of a permutation drawn from ``(seed, epoch)``,
    so the one integer ``position`` says exactly where a resumed run continues.
    """

    def __init__(self, tokenizer, examples: Sequence[Example], batch_size: int, *,
                 seed: int = 0, position: int = 0, rank: int = 0, world_size: int = 1):  # fmt: skip
        if not examples:
            raise ValueError("No instruction examples to train on: is the corpus made of plays?")
        self.tokenizer, self.examples = tokenizer, list(examples)
        self._rows: dict[int, tuple[list[int], list[int]]] = {}  # encoded on first use
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size, self.seed = batch_size, seed
        self.position, self.rank, self.world_size = position, rank, world_size
        self.examples_per_epoch = len(self.examples)
        self._order: tuple[int, np.ndarray] | None = None

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, self.examples_per_epoch)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(self.seed * 1_000_003 + epoch)
            self._order = (epoch, rng.permutation(self.examples_per_epoch))
        return int(self._order[1][i])

    def _row(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self._rows:
            self._rows[i] = encode_example(self.tokenizer, self.examples[i])
        return self._rows[i]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(batch_size, longest − 1)`` int64."""
        start = self.position + self.rank * self.batch_size
        rows = [self._row(self._index(k)) for k in range(start, start + self.batch_size)]
        self.position += self.batch_size * self.world_size
        return _pad(rows, self.pad_id)

    @property
    def epoch(self) -> float:
        return self.position / self.examples_per_epoch


class InstructionValidation:
    """Held-out examples for the training loop's evaluation: the loss on answer tokens and bits
    per character of the answers (the interface of :class:`minifusion.training.ValidationSet`:
    ``blocks[i]``, ``indices``, ``characters_of``)."""

    def __init__(self, tokenizer, examples: Sequence[Example]):
        rows = [encode_example(tokenizer, example) for example in examples]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        inputs, targets = _pad(rows, pad_id)
        self.blocks = list(zip(inputs, targets))
        # the answer and its end-of-text token (one character, as in pretraining's bpc)
        self._characters = [len(example.answer) + 1 for example in examples]

    def __len__(self) -> int:
        return len(self.blocks)

    def indices(self, count: int | None) -> list[int]:
        return list(range(len(self.blocks) if count is None else min(count, len(self.blocks))))

    def characters_of(self, indices: list[int]) -> int:
        return sum(self._characters[i] for i in indices)


def candidates(example: Example) -> list[str]:
    """The answers an example chooses between (for :func:`choice_accuracy`): yes/no, or the
    speakers of its context; ``[]`` for ``last_word`` (any word may follow)."""
    if example.task == "is_question":
        return ["no", "yes"]
    if example.task in ("next_speaker", "who_said"):
        context = example.prompt.split("\n")[:-1]
        return sorted({line.split(": ", 1)[0] for line in context})
    return []


@torch.no_grad()
def choice_accuracy(model: nn.Module, tokenizer, examples: Sequence[Example]) -> dict[str, float]:
    """Share of examples where the right answer is the *most likely* of :func:`candidates`
    (summed log-probability of its tokens, as lm-evaluation-harness scores a choice), per
    task and ``"all"``.

    Exact match asks the model to write the answer in the format; this asks only which answer
    it prefers, so a base model that never learnt the format is measured fairly: chance is
    one over the number of candidates.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = {}
    for example in examples:
        options = candidates(example)
        if not options:
            continue
        rows = [encode_example(tokenizer, Example(example.task, example.prompt, option, ""))
                for option in options]  # fmt: skip
        inputs, targets = _pad(rows, tokenizer.pad_token_id or 0)
        logits = model(input_ids=inputs.to(device)).logits.float().cpu()
        scored = (targets != IGNORE_INDEX) & (targets != tokenizer.eos_token_id)  # answer only
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])
        totals = (log_probs[..., 0] * scored).sum(dim=1)
        hits.setdefault(example.task, []).append(options[int(totals.argmax())] == example.answer)
    model.train(was_training)
    scores = {task: float(np.mean(values)) for task, values in hits.items()}
    scores["all"] = (
        float(np.mean([h for values in hits.values() for h in values])) if hits else float("nan")
    )
    return scores


@torch.no_grad()
def exact_match(
    model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 32
) -> dict[str, float]:
    """Share of examples whose greedy answer is exactly right, per task and ``"all"``.

    Greedy decoding writes the right answer (and then stops) exactly when, at every answer
    position, the most likely next token *given the right tokens so far* is the right one —
    so one teacher-forced forward pass per batch scores it, with no generation loop.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct: list[bool] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [encode_example(tokenizer, example) for example in chunk]
        inputs, targets = _pad(rows, tokenizer.pad_token_id or 0)
        predicted = model(input_ids=inputs.to(device)).logits.argmax(-1).cpu()
        scored = targets != IGNORE_INDEX
        correct += ((predicted == targets) | ~scored).all(dim=1).tolist()
    model.train(was_training)
    scores = {"all": float(np.mean(correct)) if correct else float("nan")}
    for task in TASKS:
        hits = [ok for ok, example in zip(correct, examples) if example.task == task]
        if hits:
            scores[task] = float(np.mean(hits))
    return scores
