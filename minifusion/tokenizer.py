"""Chapter 02 — a byte-level BPE tokenizer trained with Hugging Face ``tokenizers``.

Byte-level means the alphabet is the 256 possible bytes, so *any* Unicode text can be encoded
and decoded back exactly — there is no "unknown" token. BPE (byte-pair encoding) then learns
merges of frequent neighbours ("t"+"h" → "th", "th"+"e" → "the") until the vocabulary reaches
``vocab_size``. One special token, ``<|endoftext|>``, separates documents and doubles as
beginning-of-sequence, end-of-sequence and padding token.

The result is a ``transformers`` fast tokenizer, so ``save_pretrained(dir)`` followed by
``AutoTokenizer.from_pretrained(dir)`` gives it back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "ENDOFTEXT",
    "MIN_VOCAB_SIZE",
    "CompressionStats",
    "compression_stats",
    "document_encoder",
    "load_tokenizer",
    "tokenizer_hash",
    "train_tokenizer",
    "wrap_tokenizer",
]

ENDOFTEXT = "<|endoftext|>"
#: 256 byte symbols + the special token: the smallest vocabulary that can spell every text.
MIN_VOCAB_SIZE = 257


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the training documents (an iterator is fine; it is consumed once).
        vocab_size: final vocabulary size, special token included (≥ 257). Training stops early
            when no pair occurs ``min_frequency`` times, so the result can be smaller.
        min_frequency: a pair must occur at least this often to be merged.
        show_progress: show the trainer's progress bar.
        length: number of texts, only used by the progress bar.

    Returns:
        A ``transformers`` fast tokenizer with ``<|endoftext|>`` (id 0) as BOS, EOS and PAD.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE: it needs the 256 byte "
            f"symbols plus {ENDOFTEXT}, so use at least {MIN_VOCAB_SIZE} (typical: 4096-65536)."
        )
    backend = Tokenizer(models.BPE())
    # No normaliser: text is encoded exactly as given, so decoding restores it byte for byte.
    # add_prefix_space=False for the same reason — nothing is inserted into the text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` as a ``transformers`` tokenizer with our special token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,  # would rewrite " ," to "," and break round trips
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` (a directory with ``tokenizer.json``)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"No tokenizer at {path}: expected {path / 'tokenizer.json'}. Train one with "
            "minifusion.tokenizer.train_tokenizer(...) and save it with .save_pretrained(dir), "
            "or run `make train` to prepare the default one."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token != ENDOFTEXT:
        raise ValueError(
            f"The tokenizer at {path} uses eos_token={tokenizer.eos_token!r}, but MiniFusion "
            f"separates documents with {ENDOFTEXT!r}. Train a tokenizer with train_tokenizer()."
        )
    return tokenizer


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short fingerprint of the vocabulary, merges and special tokens.

    Token files record it (and checkpoints will), so a mismatch between the tokenizer a model was
    trained with and the one in use is caught instead of producing silent gibberish.
    """
    canonical = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def document_encoder(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the backend that reads special-token *strings* in a document as plain text.

    By default a tokenizer turns the characters ``<|endoftext|>`` found inside a text into the
    special token itself — a document boundary the author never wrote, and one a user could
    forge. Documents are therefore encoded with this copy; only the data pipeline places the
    real separator (id 0) between documents.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend


@dataclass(frozen=True)
class CompressionStats:
    """How much text one token carries, measured on some documents."""

    characters: int
    bytes: int
    tokens: int

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    def __str__(self) -> str:
        return (
            f"{self.characters:,} characters, {self.bytes:,} bytes → {self.tokens:,} tokens: "
            f"{self.chars_per_token:.3f} characters/token, {self.bytes_per_token:.3f} bytes/token"
        )


def compression_stats(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> CompressionStats:
    """Count characters, UTF-8 bytes and tokens over ``texts`` (no special tokens added)."""
    encoder = document_encoder(tokenizer)
    characters = n_bytes = tokens = 0
    for text in texts:
        characters += len(text)
        n_bytes += len(text.encode("utf-8"))
        tokens += len(encoder.encode(text, add_special_tokens=False).ids)
    return CompressionStats(characters=characters, bytes=n_bytes, tokens=tokens)
