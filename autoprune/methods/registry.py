"""Registry of pruning methods (a dict and a function, in the style of timm's model registry).

The built-in methods are registered by the package's ``__init__`` (:mod:`autoprune.methods`), which
imports this module and the method modules; this module imports none of them.
"""
from __future__ import annotations

from ..errors import AutopruneError, did_you_mean
from .base import PruningMethod

_METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Make ``cls`` available by ``cls.name`` (usable as a class decorator); a name taken twice is a ValueError."""
    if cls.name in _METHODS:
        raise ValueError(f"pruning method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> PruningMethod:
    key = name.lower()
    if key not in _METHODS:
        raise AutopruneError(f"unknown pruning method {name!r}; {did_you_mean(name, list(_METHODS))}")
    return _METHODS[key]()


def list_methods() -> list[str]:
    return sorted(_METHODS)
