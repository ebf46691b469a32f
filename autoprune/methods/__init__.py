"""Pruning methods behind one interface (see :mod:`autoprune.methods.base`)."""
from .base import (
    EpochReport,
    MethodOutput,
    NoParams,
    PruneContext,
    PruneStopped,
    PruningMethod,
    ScoringMethod,
    make_params,
)
from .registry import get_method, list_methods, register_method

__all__ = ["EpochReport", "MethodOutput", "NoParams", "PruneContext", "PruneStopped", "PruningMethod",
           "ScoringMethod", "get_method", "list_methods", "make_params", "register_method"]
