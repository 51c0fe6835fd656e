"""A run's settings: a preset's three sections, and ``--set section.name=value`` on top.

A preset (``configs/*.yaml``) has ``model:`` (any ``MiniFusionConfig`` field), ``data:`` (the
names in :data:`DATA_DEFAULTS`) and ``train:`` (any ``TrainConfig`` field). A command-line value
is converted by the type of the field it sets — not read as YAML, which would turn the prompt
``ROMEO:`` into a mapping, ``yes`` into ``True`` and ``*.txt`` into a parse error:

* a text field keeps the text exactly as typed;
* ``int`` / ``float`` fields take numbers (``3e-4``, ``1_000``), ``bool`` fields
  ``true/false/yes/no/on/off/1/0``, optional fields ``none`` / ``null``;
* list fields take ``[a, b]`` or ``a,b``, each item converted by the item type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DATA_DEFAULTS", "SECTIONS", "apply_overrides", "load_settings", "parse_setting"]

SECTIONS = ("model", "data", "train")
DATA_DEFAULTS: dict[str, Any] = {
    "source": "shakespeare",  # the embedded corpus; or a path/glob of .txt/.jsonl; or hf:<name>
    "val_fraction": 0.1,
    "block_size": 256,
    "text_field": "text",  # the JSONL / hub field holding each document's text
    "encoding_errors": "strict",  # "replace": substitute U+FFFD for bytes that are not UTF-8
    # streaming: read the corpus lazily instead of tokenising it ahead (for corpora too big for
    # the disk); the first val_documents are held out for validation and the tokenizer is
    # trained on the next tokenizer_documents.
    "streaming": False,
    "val_documents": 100,
    "tokenizer_documents": 10_000,
}

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


def field_types(section: str) -> dict[str, Any]:
    """``{name: type}`` of the settings a section accepts."""
    if section == "data":
        return {name: type(value) for name, value in DATA_DEFAULTS.items()}
    if section == "train":
        from .train_config import TrainConfig

        return typing.get_type_hints(TrainConfig)
    from .config import MiniFusionConfig

    return {f.name: f.type for f in dataclasses.fields(MiniFusionConfig)}


def parse_setting(text: str, kind: Any) -> Any:
    """Convert command-line ``text`` to a value of type ``kind`` (ValueError if it is not one)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        options = [a for a in args if a is not type(None)]
        # Try the strictest reading first: "3" is an int before it is a float or a text.
        order = {bool: 0, int: 1, float: 2}
        for option in sorted(options, key=lambda a: order.get(a, 3)):
            try:
                return parse_setting(text, option)
            except ValueError:
                continue
        raise ValueError(text)
    if kind is str:
        return text
    word = text.strip()
    if kind is bool:
        if word.lower() in _TRUE:
            return True
        if word.lower() in _FALSE:
            return False
        raise ValueError(text)
    if kind is int:
        number = float(word.replace("_", ""))
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    if kind is float:
        return float(word.replace("_", ""))
    if origin is list or kind is list:
        (item_kind,) = args or (str,)
        inner = word[1:-1] if word.startswith("[") and word.endswith("]") else word
        items = [item.strip().strip("'\"") for item in inner.split(",") if item.strip()]
        return [parse_setting(item, item_kind) for item in items]
    return yaml.safe_load(text)  # mappings (rope_parameters) and anything without a simple type


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def apply_overrides(settings: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.name=value`` strings to a preset's sections (a new dict is returned).

    Names a section does not know are kept as text; :func:`load_settings` and the configs
    report them with the list of valid names.
    """
    settings = {section: dict(settings.get(section) or {}) for section in SECTIONS}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(
                f"--set {item!r}: write section.name=value, e.g. train.max_steps=400 "
                f"(sections: {', '.join(SECTIONS)})."
            )
        if section not in SECTIONS:
            raise ValueError(
                f"--set {item!r}: unknown section {section!r}; use one of {', '.join(SECTIONS)}."
            )
        kinds = field_types(section)
        if name not in kinds:
            settings[section][name] = text
            continue
        try:
            settings[section][name] = parse_setting(text, kinds[name])
        except ValueError:
            raise ValueError(
                f"--set {item!r}: {section}.{name} takes a value of type "
                f"{_type_name(kinds[name])}; {text!r} is not one."
            ) from None
    return settings


def load_settings(config_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A preset's sections with ``overrides`` applied and the data defaults filled in."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist (presets are in configs/).")
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level section(s) {unknown}; use {list(SECTIONS)}.")
    settings = apply_overrides(document, overrides)
    unknown_data = sorted(set(settings["data"]) - set(DATA_DEFAULTS))
    if unknown_data:
        raise ValueError(
            f"Unknown data setting(s) {unknown_data}. Valid names: {sorted(DATA_DEFAULTS)}."
        )
    settings["data"] = {**DATA_DEFAULTS, **settings["data"]}
    # One block size for data and training: the data section's unless train sets its own.
    settings["train"].setdefault("block_size", settings["data"]["block_size"])
    return settings
