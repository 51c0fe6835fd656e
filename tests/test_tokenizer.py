import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from minifusion.tokenizer import (
    ENDOFTEXT,
    compression_stats,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

from .conftest import SAMPLE_DOCUMENTS


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(min_size=0, max_size=200))
def test_round_trip_of_any_unicode(small_tokenizer, text):
    ids = small_tokenizer.encode(text, add_special_tokens=False)
    assert small_tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_round_trip_after_save_and_load(tmp_path_factory, small_tokenizer, text):
    folder = tmp_path_factory.getbasetemp() / "tok_roundtrip"
    if not (folder / "tokenizer.json").exists():
        small_tokenizer.save_pretrained(str(folder))
    loaded = AutoTokenizer.from_pretrained(str(folder))
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_special_token_is_bos_eos_pad_with_id_zero(small_tokenizer):
    assert (
        small_tokenizer.bos_token
        == small_tokenizer.eos_token
        == small_tokenizer.pad_token
        == ENDOFTEXT
    )
    assert small_tokenizer.eos_token_id == 0
    # nothing is added implicitly: documents are joined explicitly by the data pipeline
    assert small_tokenizer("hello")["input_ids"] == small_tokenizer.encode(
        "hello", add_special_tokens=False
    )


def test_vocab_size_is_respected_and_learns_merges():
    tok = train_tokenizer(SAMPLE_DOCUMENTS, vocab_size=300)
    assert len(tok) == 300
    assert len(tok.encode(SAMPLE_DOCUMENTS[0])) < len(SAMPLE_DOCUMENTS[0].encode("utf-8"))


@pytest.mark.parametrize("bad", [0, 256, 100, "4096"])
def test_too_small_vocab_is_rejected(bad):
    with pytest.raises(ValueError, match="257"):
        train_tokenizer(["abc"], vocab_size=bad)


def test_save_load_keeps_hash(tmp_path, small_tokenizer):
    small_tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_hash(loaded) == tokenizer_hash(small_tokenizer)
    other = train_tokenizer(SAMPLE_DOCUMENTS[:2], vocab_size=300)
    assert tokenizer_hash(other) != tokenizer_hash(small_tokenizer)


def test_training_is_deterministic():
    a = train_tokenizer(SAMPLE_DOCUMENTS, vocab_size=350)
    b = train_tokenizer(SAMPLE_DOCUMENTS, vocab_size=350)
    assert tokenizer_hash(a) == tokenizer_hash(b)


def test_load_missing_tokenizer_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_compression_stats(small_tokenizer):
    texts = ["abc abc", "é🙂"]
    stats = compression_stats(small_tokenizer, texts)
    assert stats.characters == 9 and stats.bytes == 7 + 2 + 4
    expected_tokens = sum(len(small_tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    assert stats.tokens == expected_tokens
    assert stats.chars_per_token == pytest.approx(9 / expected_tokens)
    assert "characters/token" in str(stats)
