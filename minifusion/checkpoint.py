"""Chapter 13 — checkpoints that never lose work.

A training run can die at any moment: a pre-empted cloud machine, an out-of-memory kill, a
power cut, someone pressing Ctrl-C. Three rules make sure that costs minutes, not the run:

1. **Atomic writes.** A checkpoint is written into a hidden temporary folder, every file is
   flushed to disk (``fsync``), and only then is the folder renamed to its final name. A rename
   within one file system is atomic: readers see either the old set of checkpoints or the new
   one, never half a checkpoint. A process killed mid-save leaves a stray temporary folder that
   nobody mistakes for a checkpoint (the next save removes it).
2. **Everything needed to continue exactly.** Model, optimizer and scheduler state, the step,
   the tokens seen, the data position, and every random number generator (Python, NumPy, torch,
   CUDA), plus the model config and the tokenizer's hash so a checkpoint is never resumed with
   a different model or vocabulary.
3. **Safe loading.** ``torch.load(..., weights_only=True)`` refuses to run code hidden in a
   pickle; a SHA-256 recorded in ``meta.json`` catches a truncated or corrupted file before it
   is used. The finished model is exported as safetensors (raw tensors, no code at all) in a
   Hugging Face folder that ``from_pretrained`` loads.

Layout of a run folder's checkpoints::

    checkpoints/
      step_000200/
        state.pt     model + optimizer + scheduler + RNG states (torch.save, loaded weights_only)
        meta.json    step, tokens, data position, config, tokenizer hash, SHA-256 of state.pt
      step_000300/
        ...
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import fsync_dir

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "capture_rng_state",
    "check_compatible",
    "complete_checkpoint",
    "export_pretrained",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_meta",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "minifusion-checkpoint-1"
STATE_FILE, META_FILE = "state.pt", "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Config entries that describe the file, not the model: they may differ between equal models.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype",
                         "torch_dtype", "_commit_hash", "auto_map", "use_cache"}  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


class CorruptCheckpointError(CheckpointError):
    """The files on disk are truncated, damaged or not a checkpoint at all."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but belongs to a different model or tokenizer."""


# ----------------------------------------------------------------------------------------------
# Random number generators
# ----------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every RNG a run touches, as tensors that ``torch.load(weights_only=True)`` accepts.

    NumPy's state holds an array, which the safe unpickler refuses, and Python's is a tuple of
    624 integers whose pickled size depends on their values; both are stored as fixed-size
    tensors, so a checkpoint's size does not depend on where the generators happen to be.
    """
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            # (has a cached Gaussian, its value): None becomes (0, 0)
            "gauss_next": torch.tensor(
                [gauss_next is not None, gauss_next or 0.0], dtype=torch.float64
            ),
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos_has_gauss": torch.tensor([pos, has_gauss], dtype=torch.int64),
            "cached_gaussian": torch.tensor(cached_gaussian, dtype=torch.float64),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every RNG back where :func:`capture_rng_state` found it."""
    python = state["python"]
    has_gauss_next, gauss_next = python["gauss_next"].tolist()
    random.setstate(
        (python["version"], tuple(python["words"].tolist()), gauss_next if has_gauss_next else None)
    )
    npy = state["numpy"]
    pos, has_gauss = npy["pos_has_gauss"].tolist()
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(npy["cached_gaussian"]),
        )  # fmt: skip
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # another GPU count: the first state seeds device 0, the others keep theirs
            torch.cuda.set_rng_state(cuda_states[0], 0)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _write_file(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    directory: str | Path,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep_last: int | None = 3,
) -> Path:
    """Write ``state`` (tensors, numbers, strings) and ``meta`` as ``directory/step_NNNNNN``.

    ``meta`` must hold ``step``; the file's size and SHA-256 and the format tag are added.
    The checkpoint appears under its final name only once complete (see the module docstring).
    Afterwards only the newest ``keep_last`` checkpoints are kept (``None`` keeps all).

    Returns:
        The checkpoint folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    final = directory / step_dir_name(step)
    if final.is_dir():  # this exact step is already safely on disk (e.g. periodic save + signal)
        return final
    _remove_stale_temporaries(directory)
    tmp = directory / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_file(tmp / STATE_FILE, lambda handle: torch.save(state, handle))
    meta = {
        **meta,
        "format": CHECKPOINT_FORMAT,
        "state_bytes": (tmp / STATE_FILE).stat().st_size,
        "state_sha256": _sha256(tmp / STATE_FILE),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return complete_checkpoint(tmp, final, meta, keep_last=keep_last)


def complete_checkpoint(
    tmp: Path, final: Path, meta: dict[str, Any], *, keep_last: int | None
) -> Path:
    """Write ``meta.json`` into the filled temporary folder, rename it to ``final``, rotate.

    The last step of every save (single-process or DeepSpeed): until the rename, nothing
    under a ``step_*`` name exists, so a crash before it leaves only debris.
    """
    payload = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
    _write_file(tmp / META_FILE, lambda handle: handle.write(payload))
    fsync_dir(tmp)
    os.rename(tmp, final)  # the moment the checkpoint exists: atomic
    fsync_dir(final.parent)
    if keep_last is not None:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old)
    return final


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete half-written folders that a killed process left behind."""
    for stale in directory.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding and reading
# ----------------------------------------------------------------------------------------------
def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary folders never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _STEP_DIR.match(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or ``None`` if there is none."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def read_meta(
    checkpoint: str | Path, formats: tuple[str, ...] = (CHECKPOINT_FORMAT,)
) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder, with a clear error if it is missing or damaged."""
    checkpoint = Path(checkpoint)
    meta_path = checkpoint / META_FILE
    if not checkpoint.is_dir():
        found = [p.name for p in list_checkpoints(checkpoint.parent)]
        raise CheckpointError(
            f"There is no checkpoint folder {checkpoint}. "
            + (
                f"Checkpoints in {checkpoint.parent}: {found}."
                if found
                else f"{checkpoint.parent} holds no checkpoints."
            )  # fmt: skip
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{checkpoint} has no {META_FILE}, so it is not a complete MiniFusion checkpoint. "
            f"{_older_hint(checkpoint)}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(
            f"{meta_path} is damaged ({error}). {_older_hint(checkpoint)}"
        ) from None
    if meta.get("format") not in formats:
        raise CorruptCheckpointError(
            f"{meta_path} has format {meta.get('format')!r}, expected one of {list(formats)}: "
            "this folder was not written by a MiniFusion trainer of this kind."
        )
    return meta


def load_checkpoint(
    checkpoint: str | Path, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder safely; returns ``(state, meta)``.

    The state file's size and SHA-256 are checked against ``meta.json`` first (``verify``), so a
    truncated or bit-flipped file is reported as such instead of failing somewhere inside
    unpickling — or worse, loading garbage weights. Loading uses ``weights_only=True``: only
    tensors, numbers, strings and containers are accepted, no code.
    """
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    state_path = checkpoint / STATE_FILE
    if not state_path.is_file():
        raise CorruptCheckpointError(f"{state_path} is missing. {_older_hint(checkpoint)}")
    if verify:
        size = state_path.stat().st_size
        if size != meta["state_bytes"]:
            raise CorruptCheckpointError(
                f"{state_path} is {size:,} bytes but was saved as {meta['state_bytes']:,}: the "
                f"file is truncated or was overwritten. {_older_hint(checkpoint)}"
            )
        if _sha256(state_path) != meta["state_sha256"]:
            raise CorruptCheckpointError(
                f"{state_path} does not match the SHA-256 recorded when it was saved: the file "
                f"is corrupted. {_older_hint(checkpoint)}"
            )
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean the same here
        raise CorruptCheckpointError(
            f"{state_path} cannot be read safely ({type(error).__name__}: {error}). "
            f"{_older_hint(checkpoint)}"
        ) from error
    return state, meta


def _older_hint(checkpoint: Path) -> str:
    others = [p for p in list_checkpoints(checkpoint.parent) if p != checkpoint]
    if others:
        return f"Delete {checkpoint} to resume from the previous checkpoint, {others[-1].name}."
    return f"Delete {checkpoint} (or start over with --fresh)."


# ----------------------------------------------------------------------------------------------
# Compatibility
# ----------------------------------------------------------------------------------------------
def comparable_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A model config as plain JSON data without the entries that describe the file.

    The JSON round trip makes a live config and one read back from ``meta.json`` comparable
    (JSON turns integer keys such as ``id2label``'s into strings).
    """
    plain = json.loads(json.dumps(config_dict))
    return {k: v for k, v in plain.items() if k not in _VOLATILE_CONFIG_KEYS}


def check_compatible(
    meta: dict[str, Any], *, model_config: dict[str, Any], tokenizer_hash: str, where: str = ""
) -> None:
    """Refuse to resume a checkpoint with another model shape or another tokenizer.

    Raises:
        CheckpointMismatchError: naming every differing config field, or both tokenizer hashes.
    """
    saved = comparable_config(meta["model_config"])
    current = comparable_config(model_config)
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    location = where or f"the checkpoint at step {meta.get('step')}"
    if differing:
        details = ", ".join(
            f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs run {current.get(k, '<absent>')!r}"
            for k in differing[:8]
        )
        more = f" (and {len(differing) - 8} more)" if len(differing) > 8 else ""
        raise CheckpointMismatchError(
            f"{location} was trained with a different model config — {details}{more}. Resume "
            "with the config it was trained with, or start a new run (--fresh or another --out)."
        )
    if meta.get("tokenizer_hash") != tokenizer_hash:
        raise CheckpointMismatchError(
            f"{location} was trained with tokenizer {meta.get('tokenizer_hash')}, but this run "
            f"uses tokenizer {tokenizer_hash}: token ids would mean different text. Resume with "
            "the run's own tokenizer folder, or start a new run (--fresh or another --out)."
        )


def remove_run_outputs(out_dir: str | Path, names: tuple[str, ...]) -> None:
    """Delete the files and folders ``names`` of a run folder (a run started over with
    ``--fresh``); anything else there — prepared data, a tokenizer — stays."""
    for name in names:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The finished model: a Hugging Face folder with safetensors
# ----------------------------------------------------------------------------------------------
@contextmanager
def _quiet_hf_progress():
    """No "Writing model shards" bar for a one-file model (it would land on stderr)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class ExportInfo:
    path: Path
    files: list[str]


def file_in_the_way(out: str | Path, folder: str) -> str | None:
    """The error when ``--out`` names a file where a command writes a folder (``folder`` says what
    that folder is); ``None`` when it does not."""
    if Path(out).exists() and not Path(out).is_dir():
        return f"--out {out} is a file; {folder}. Choose another path."
    return None


def export_target_problem(directory: str | Path) -> str | None:
    """Why an export may not be written to ``directory`` (``None``: it may).

    An export replaces the folder whole. That is right for an earlier export (it has a
    ``config.json``) or an empty or missing folder; anything else there — a file, or a folder of
    someone's files — would be deleted, so it is refused instead.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        return (f"{directory} is a file; an export is a folder. Choose another path, or remove "
                "the file first.")  # fmt: skip
    if any(directory.iterdir()) and not (directory / "config.json").is_file():
        return (f"{directory} holds files that are not a model export (it has no config.json); "
                "an export replaces the whole folder and would delete them. Choose a new or "
                "empty folder, or move those files away first.")  # fmt: skip
    return None


def export_pretrained(
    model, tokenizer, directory: str | Path, training: dict[str, str] | None = None
) -> ExportInfo:
    """Write ``config.json`` + ``model.safetensors`` + the tokenizer into ``directory``.

    A MiniFusion model also writes its modelling code and a model card (``README.md``, with
    ``training``'s facts as a table; see ``hub.py``): ``AutoModelForCausalLM.from_pretrained(
    directory, trust_remote_code=True)`` loads it without this package, and plain
    ``from_pretrained(directory)`` after ``import minifusion``. Like checkpoints, the folder is
    built under a temporary name and swapped in whole, so an interrupted export leaves the
    previous export intact. A ``directory`` that holds anything but an earlier export is refused
    (:func:`export_target_problem`), never deleted.
    """
    directory = Path(directory)
    problem = export_target_problem(directory)
    if problem is not None:
        raise FileExistsError(problem)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_hf_progress():
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if training is not None and (tmp / "README.md").is_file():  # a MiniFusion model's card
        from .hub import write_model_card

        write_model_card(tmp, model.config, model.num_parameters(), training)
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(tmp)
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return ExportInfo(directory, sorted(p.name for p in directory.iterdir()))
