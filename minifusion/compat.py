"""The one place that knows which transformers release is installed.

transformers 5.24 renamed the generation cache: model outputs carry it as ``cache`` (before:
``past_key_values``), ``generate()`` hands it to ``prepare_inputs_for_generation`` and to
``forward`` as ``cache=``, and every ``ModelOutput`` subclass's ``__init__`` rewrites a
``past_key_values=`` keyword to ``cache=``. A model that still declares ``past_key_values``
then fails to build its own outputs, and one that only reads ``past_key_values`` in
``prepare_inputs_for_generation`` never sees the cache ``generate()`` passes back.

MiniFusion writes the new name everywhere and this module adapts it to older releases:

* :data:`CACHE_NAME` — the name the installed ``generate()`` uses, read off the signature of
  ``GenerationMixin.prepare_inputs_for_generation`` (a feature, not a version number);
* :func:`model_output` — a dataclass decorator for our output classes: they declare a
  ``cache`` field, which becomes ``past_key_values`` on older releases, and both spellings of
  the keyword and of the attribute work on every release;
* :func:`cache_keyword` — ``{CACHE_NAME: cache}``, to hand a cache to any transformers model;
* :func:`cache_argument` — picks the cache out of ``cache=`` / ``past_key_values=``, so our
  ``forward`` and ``prepare_inputs_for_generation`` accept either, as transformers' own models do.

When a new release breaks us, the fix belongs here (``make test-latest`` shows it first).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

from transformers import GenerationMixin

__all__ = ["CACHE_NAME", "cache_argument", "cache_keyword", "model_output"]

_NEW_NAME, _OLD_NAME = "cache", "past_key_values"

CACHE_NAME: str = (
    _NEW_NAME
    if _NEW_NAME in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else _OLD_NAME
)
"""``"cache"`` on transformers ≥ 5.24, ``"past_key_values"`` before."""

OutputClass = TypeVar("OutputClass", bound=type)


def model_output(cls: OutputClass) -> OutputClass:
    """``@dataclass`` for a ``ModelOutput`` subclass that declares its cache as ``cache``.

    On a release that names it ``past_key_values`` the field is renamed before the dataclass is
    made (so ``generate()`` finds it by its name there), ``cache=`` is still accepted by
    ``__init__`` and ``.cache`` still reads it. Newer releases provide the reverse aliases
    themselves (``past_key_values=`` and ``.past_key_values``).
    """
    if CACHE_NAME == _NEW_NAME:
        return dataclasses.dataclass(cls)
    annotations = cls.__dict__.get("__annotations__", {})
    if _NEW_NAME not in annotations:
        raise TypeError(f"{cls.__name__} has no `cache` field to adapt")
    cls.__annotations__ = {
        (_OLD_NAME if name == _NEW_NAME else name): kind for name, kind in annotations.items()
    }
    setattr(cls, _OLD_NAME, cls.__dict__[_NEW_NAME])  # the field's default value
    delattr(cls, _NEW_NAME)
    cls = dataclasses.dataclass(cls)
    dataclass_init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _NEW_NAME in kwargs:
            kwargs[_OLD_NAME] = kwargs.pop(_NEW_NAME)
        dataclass_init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.cache = property(lambda self: getattr(self, _OLD_NAME))
    return cls


def cache_argument(cache: Any = None, past_key_values: Any = None) -> Any:
    """The cache a caller passed under either name (passing two different ones is an error)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once: as `cache=` or as `past_key_values=`, not both.")
    return cache if cache is not None else past_key_values


def cache_keyword(cache: Any) -> dict[str, Any]:
    """``{CACHE_NAME: cache}``: the keyword any transformers model's ``forward`` reads its cache
    from on the installed release (ours accept both names)."""
    return {CACHE_NAME: cache}
