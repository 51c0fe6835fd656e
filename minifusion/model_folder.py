"""Loading a saved model folder for the command-line tools, with errors that say what to do.

``python -m minifusion.generate`` and ``python -m minifusion.evaluate`` accept any folder that
``AutoModelForCausalLM.from_pretrained`` reads and that holds its tokenizer: the export of a
MiniFusion run (``runs/tiny/model``) or any transformers causal language model saved with
``save_pretrained`` — so a user can compare like with like.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import model as _registers_minifusion  # noqa: F401  (AutoModel then knows "minifusion")

__all__ = ["ModelFolderError", "device_named", "load_model_folder", "resolve_device"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelFolderError(ValueError):
    """A model folder that cannot be used, with the reason and the fix in the message."""


def check_model_folder(path: str | Path) -> Path:
    """``path`` if it looks like a saved causal LM with its tokenizer; else a clear error."""
    path = Path(path)
    if not path.exists():
        hint = (
            " A training run exports its model to <run>/model when it finishes "
            "(`make train` writes runs/tiny/model)."
        )
        raise ModelFolderError(f"{path} does not exist.{hint}")
    if not path.is_dir():
        raise ModelFolderError(
            f"{path} is a file; pass the folder that holds config.json and the weights "
            "(a training run's export is <run>/model)."
        )
    if not (path / "config.json").is_file():
        found = "a run folder" if (path / "model" / "config.json").is_file() else "no config.json"
        fix = f" Did you mean {path / 'model'}?" if found == "a run folder" else ""
        raise ModelFolderError(
            f"{path} is not a saved model: {found}, while a model folder holds config.json and "
            f"model.safetensors (written by save_pretrained).{fix}"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelFolderError(
            f"{path} holds a model but no tokenizer (none of {', '.join(_TOKENIZER_FILES)}). "
            "Save it next to the model: tokenizer.save_pretrained(folder)."
        )
    return path


def load_model_folder(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, object]:
    """``(model in eval mode on device, tokenizer)`` from a folder :func:`check_model_folder`
    accepts. A ``model_type`` transformers does not know gets an error naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_folder(path)
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (ValueError, KeyError) as error:
        raise ModelFolderError(
            f"{path}: transformers cannot build a causal language model of model_type "
            f"{model_type!r} ({error}). Supported: MiniFusion exports and the causal LMs of the "
            "installed transformers."
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA if available, else the CPU; any other name as :func:`device_named`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device_named(name)


def device_named(name: str) -> torch.device:
    """The device a user named (``cpu``, ``cuda``, ``cuda:1``, ``mps``). A name torch does not
    know, or a device this machine lacks, is a ``ValueError`` saying what to use instead (the
    commands print it as their error line) rather than a failure at the first tensor moved."""
    from .utils import pick_device

    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device: use auto, cpu, cuda, cuda:N or mps.") from None
    try:
        return pick_device(name)
    except RuntimeError as error:  # e.g. "Device 'cuda' was requested but CUDA is not available"
        raise ValueError(str(error)) from None
