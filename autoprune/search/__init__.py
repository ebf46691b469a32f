"""The search layer: spec files, the parameter space, the trial runner, and the Python entry point.

``autoprune.search(spec, out=..., backend=..., sampler=...)`` runs a search from Python: this package
is callable, and calling it calls :func:`autoprune.search.api.search` (see there), which returns a
:class:`~autoprune.search.api.SearchResult`. (A package, not a function, because ``autoprune.search``
is also where the search modules live: importing one of them must not replace the entry point.)
"""
from __future__ import annotations

import sys
import types
from typing import Any

from .space import Range, suggest, to_prune_args
from .spec import Budget, EarlyStop, SearchSpec, dump_spec, load_spec

__all__ = ["Budget", "EarlyStop", "Range", "SearchResult", "SearchSpec", "dump_spec", "load_search", "load_spec",
           "run", "suggest", "to_prune_args"]


def run(*args: Any, **kwargs: Any) -> Any:
    """:func:`autoprune.search.api.search` (also reached as ``autoprune.search(...)``)."""
    from .api import search

    return search(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("SearchResult", "load_search"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run a search: see :func:`autoprune.search.api.search`."""
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
