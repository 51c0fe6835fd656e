import math

import pytest
import torch
import torch.nn.functional as F

from minifusion.config import MiniFusionConfig
from minifusion.embedding import TokenEmbedding, build_lm_head


@pytest.fixture
def config():
    return MiniFusionConfig(vocab_size=512, hidden_size=64)


def test_lookup_equals_one_hot_matmul(config):
    torch.manual_seed(0)
    emb = TokenEmbedding(config)
    ids = torch.randint(0, config.vocab_size, (3, 7))
    one_hot = F.one_hot(ids, config.vocab_size).float()
    assert torch.equal(emb(ids), one_hot @ emb.weight)
    assert emb(ids).shape == (3, 7, config.hidden_size)


def test_tied_head_shares_the_parameter(config):
    emb = TokenEmbedding(config)
    head = build_lm_head(config, emb)
    assert head.weight is emb.weight
    module = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert sum(p.numel() for p in module.parameters()) == config.vocab_size * config.hidden_size


def test_untied_head_is_separate(config):
    config.tie_word_embeddings = False
    emb = TokenEmbedding(config)
    head = build_lm_head(config, emb)
    assert head.weight is not emb.weight
    assert head.weight.std().item() == pytest.approx(config.initializer_range, rel=0.1)


def test_initial_loss_is_close_to_uniform_guess(config):
    torch.manual_seed(0)
    emb = TokenEmbedding(config)
    head = build_lm_head(config, emb)
    ids = torch.randint(0, config.vocab_size, (4, 64))
    hidden = torch.randn(4, 64, config.hidden_size)  # unit-scale hidden states after a final norm
    loss = F.cross_entropy(head(hidden).flatten(0, 1), ids.flatten())
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.05


def test_out_of_vocabulary_ids_get_a_clear_error(config):
    emb = TokenEmbedding(config)
    with pytest.raises(IndexError, match="vocab_size"):
        emb(torch.tensor([[1, config.vocab_size]]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.zeros(2, 2))
