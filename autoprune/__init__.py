"""autoprune: AutoML search-and-prune for convolutional networks.

The library's front doors: :func:`prune` (one method, one target), :func:`load_pruned`
(rebuild a saved pruned model) and the ``autoprune`` command line (search, pareto, retrain).
"""
from __future__ import annotations

import logging

from .engine import PruneResult, prune
from .plan import Plan, load_base, load_pruned

__all__ = ["Plan", "PruneResult", "load_base", "load_pruned", "prune"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
