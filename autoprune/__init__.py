"""autoprune: AutoML search-and-prune for convolutional networks.

The library's front doors: :func:`prune` (one method, one target), :func:`save_base` and
:func:`import_model` (a trained model becomes a base checkpoint), :func:`load_pruned` (rebuild a saved
pruned model) and the ``autoprune`` command line (import, search, pareto, retrain).
"""
from __future__ import annotations

import logging

from .engine.plan import Plan, load_base, load_pruned, save_base
from .engine.pruning import PruneResult, prune
from .models.importing import import_model

__all__ = ["Plan", "PruneResult", "import_model", "load_base", "load_pruned", "prune", "save_base"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
