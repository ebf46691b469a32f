"""Pruning methods behind one interface (see :mod:`autoprune.methods.base`)."""
from .base import (
    MethodOutput,
    NoParams,
    PruneContext,
    PruningMethod,
    Training,
    make_params,
)
from .registry import get_method, list_methods, register_method

__all__ = ["MethodOutput", "NoParams", "PruneContext", "PruningMethod",
           "Training", "get_method", "list_methods", "make_params", "register_method"]
