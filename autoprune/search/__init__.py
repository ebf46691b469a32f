"""The search layer: spec files, the parameter space, and (elsewhere in this package) the trial runner."""
from __future__ import annotations

from .space import Range, suggest, to_prune_args
from .spec import Budget, EarlyStop, SearchSpec, dump_spec, load_spec

__all__ = ["Budget", "EarlyStop", "Range", "SearchSpec", "dump_spec", "load_spec", "suggest", "to_prune_args"]
