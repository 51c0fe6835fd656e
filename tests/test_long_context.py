"""Chapter 15's long-context checks: the passkey task's sequences, its scoring at every length
(against a model that reads the answer off the input, and one that cannot), and the loss by
position (against a loss computed block by block with plain cross-entropy)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from minifusion.long_context import (
    PasskeyRetrieval,
    accuracy_by_length,
    mean_by_span,
    per_position_loss,
)
from minifusion.model import MiniFusionForCausalLM

from .test_model import small_config


def test_a_passkey_sequence_holds_the_key_once_and_asks_for_it_at_the_end():
    task = PasskeyRetrieval(length=40, digits=3, num_symbols=5, num_filler=2)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (64, 40)
    sequences = batch.sequences
    for row in sequences:
        keys = (row == task.key_marker).nonzero().flatten()
        assert len(keys) == 1 and int((row == task.query_marker).sum()) == 1
        key = row[keys[0] + 1 : keys[0] + 4]
        assert (key >= task.num_filler + 2).all()  # passkey symbols, not markers or filler
        assert row[-4] == task.query_marker and torch.equal(row[-3:], key)
        rest = torch.cat([row[: keys[0]], row[keys[0] + 4 : -4]])
        assert (rest < task.num_filler).all() and len(rest) == 40 - 1 - 2 * 3
    # the answers scored: the last `digits` inputs, whose targets spell the key
    assert batch.mask[:, -3:].all() and not batch.mask[:, :-3].any()
    assert torch.equal(batch.targets[batch.mask].view(64, 3), sequences[:, -3:])
    depths = (sequences == task.key_marker).nonzero()[:, 1]
    assert depths.min() == 0 and depths.max() == 40 - 1 - 2 * 3  # every depth can occur
    assert task.at_length(1000).sample(2, torch.Generator()).inputs.shape == (2, 1000)
    with pytest.raises(ValueError, match="length"):
        PasskeyRetrieval(length=7, digits=3)


class ReadsTheKey(nn.Module):
    """Predicts, at every position after the query marker, the key symbol that follows the key
    marker at the same offset — a perfect passkey model; ``blind`` predicts symbol 0 instead."""

    def __init__(self, task: PasskeyRetrieval, blind: bool = False):
        super().__init__()
        self.task, self.blind = task, blind
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, for the device lookup

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.task.vocab_size)
        first_symbol = self.task.num_filler + 2
        key_at = (input_ids == self.task.key_marker).int().argmax(dim=1)
        query_at = (input_ids == self.task.query_marker).int().argmax(dim=1)
        for b in range(B):
            for offset in range(self.task.digits):
                answer = first_symbol if self.blind else input_ids[b, key_at[b] + 1 + offset]
                logits[b, query_at[b] + offset, answer] = 1.0
        return CausalLMOutput(logits=logits)


def test_accuracy_by_length_scores_a_perfect_reader_and_a_blind_one():
    task = PasskeyRetrieval(length=32, digits=2, num_symbols=4)
    lengths = [32, 100, 300]
    perfect = accuracy_by_length(ReadsTheKey(task), task, lengths, sequences=24, batch_size=5)
    assert perfect == {n: (1.0, 1.0) for n in lengths}
    blind = accuracy_by_length(ReadsTheKey(task, blind=True), task, lengths, sequences=200)
    for accuracy, exact in blind.values():  # symbol 0 is right a quarter of the time
        assert 0.15 < accuracy < 0.35 and exact < 0.15
    # each length draws its own sequences: adding a length leaves the others' scores unchanged
    alone = accuracy_by_length(ReadsTheKey(task, blind=True), task, [100], sequences=200)
    assert alone[100] == blind[100]


def test_per_position_loss_equals_the_loss_of_each_block_by_hand():
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config(vocab_size=50)).eval()
    ids = torch.randint(50, (3 * 12 + 5,))  # three whole blocks of 12 and a remainder
    losses = per_position_loss(model, ids, 12, batch_size=2)
    expected = torch.zeros(12, dtype=torch.float64)
    with torch.no_grad():
        for start in (0, 12, 24):  # each window starts on the last token of the one before
            window = ids[start : start + 13]
            logits = model(input_ids=window[None, :-1]).logits[0]
            expected += F.cross_entropy(logits, window[1:], reduction="none").double()
    torch.testing.assert_close(losses, expected / 3, rtol=1e-5, atol=1e-6)
    assert per_position_loss(model, ids, 12, max_blocks=1).shape == (12,)
    with pytest.raises(ValueError, match="fewer than one block"):
        per_position_loss(model, ids[:10], 12)
    assert mean_by_span(torch.arange(8.0), [0, 4, 8]) == [1.5, 5.5]
    with pytest.raises(ValueError, match="edges"):
        mean_by_span(torch.arange(8.0), [0, 9])
