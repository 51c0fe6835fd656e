"""Shared fixtures: small local corpora and a small trained tokenizer (no network needed)."""

from __future__ import annotations

import contextlib
import os
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

# A few original lines of text in several scripts, so byte-level BPE sees multi-byte characters.
SAMPLE_DOCUMENTS = [
    "The river keeps no record of the rain, yet every drop is in it.\n" * 20,
    "A lantern on the hill answers the lantern in the valley.\nThey never meet.\n" * 20,
    "Café crème, naïve façade — déjà vu.\nΚαλημέρα κόσμε.\n你好，世界。\n🙂🚀\n" * 20,
    "Numbers too: 3.14159, 2.71828, 1.41421; tabs\tand\r\nwindows line ends.\n" * 20,
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _child_processes_keep_temporary_files_here(tmp_path_factory):
    """Processes the tests start (torchrun and its ranks, benchmark workers, command-line runs,
    the browser) write their temporary files under this session's pytest folder, which pytest
    prunes, not in the system's: torchrun alone makes a ``torchelastic_*`` folder for every launch
    and never removes it. This process keeps its own temporary folder (already chosen)."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.fixture
def text_corpus(tmp_path):
    """Four .txt documents in a folder; returns the folder."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(SAMPLE_DOCUMENTS):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


def write_training_corpus(folder):
    """Five .txt documents (the samples plus one reversed) for training runs; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(SAMPLE_DOCUMENTS + [SAMPLE_DOCUMENTS[0][::-1]]):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


def write_words_corpus(folder, documents: int = 5, words: int = 1000, seed: int = 0):
    """``documents`` .txt files of seeded random words (ASCII; unpredictable enough that even a
    4096-token BPE leaves about a token per word); returns ``folder``."""
    import random

    vocabulary = " ".join(SAMPLE_DOCUMENTS[:2]).split()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        text = " ".join(rng.choice(vocabulary) for _ in range(words))
        (folder / f"doc{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def small_tokenizer():
    from minifusion.tokenizer import train_tokenizer

    return train_tokenizer(SAMPLE_DOCUMENTS * 3, vocab_size=400)


def write_plays(folder, plays: int = 6, turns: int = 80, seed: int = 0):
    """``plays`` .txt files shaped like the corpus's plays (a speaker line such as ``Romeo.``
    above each speech, stage directions in brackets, act headings); returns ``folder``."""
    import random

    rng = random.Random(seed)
    words = " ".join(SAMPLE_DOCUMENTS[:2]).replace(".", "").replace(",", "").split()
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(plays):
        names = ("Romeo", "Juliet", "Nurse", "Tybalt", "Paris", "Mercutio", "Benvolio", "Friar")
        cast = [names[(p + k) % len(names)] for k in range(4)]
        paragraphs = [f"THE PLAY NUMBER {p}", "ACT I.", "[Enter all.]"]
        for _ in range(turns):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + rng.choice("?.!,")
                     for _ in range(rng.randint(1, 3))]  # fmt: skip
            paragraphs.append("\n".join([f"{rng.choice(cast)}.", *lines]))
        (folder / f"play{p}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return folder


@contextlib.contextmanager
def library_progress_bar_on():
    """transformers' progress bars switched on, as in a fresh process (a command's
    ``--no-progress`` must switch them off), and restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
