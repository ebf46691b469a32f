"""Pruning methods behind one interface (see :mod:`autoprune.methods.base`).

The built-in methods are registered here, after their modules are imported: the registry
(:mod:`autoprune.methods.registry`) never imports a method module, and no method module imports
the registry, so the import graph has no circle. A user's method calls :func:`register_method`.
"""
from .base import (
    MethodOutput,
    NoParams,
    PruneContext,
    PruningMethod,
    Training,
    make_params,
)
from .fsm import FSM
from .l1 import L1
from .lrf import LRF
from .registry import get_method, list_methods, register_method
from .resrep import ResRep

for _method in (L1, ResRep, LRF, FSM):
    register_method(_method)
del _method

__all__ = [
    "FSM",
    "L1",
    "LRF",
    "MethodOutput",
    "NoParams",
    "PruneContext",
    "PruningMethod",
    "ResRep",
    "Training",
    "get_method",
    "list_methods",
    "make_params",
    "register_method",
]
