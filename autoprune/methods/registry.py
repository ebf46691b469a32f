"""Registry of pruning methods (a dict and a decorator, in the style of timm's model registry)."""
from __future__ import annotations

from ..errors import AutopruneError, did_you_mean
from .base import PruningMethod

_METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    if cls.name in _METHODS:
        raise ValueError(f"pruning method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> PruningMethod:
    _load_builtin()
    key = name.lower()
    if key not in _METHODS:
        raise AutopruneError(f"unknown pruning method {name!r}; {did_you_mean(name, list(_METHODS))}")
    return _METHODS[key]()


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    """Import the built-in methods so their ``@register_method`` runs (lazily: they import train.py)."""
    from . import fsm, l1, lrf, resrep  # noqa: F401
