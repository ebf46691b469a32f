"""autoprune: AutoML search-and-prune for convolutional networks.

The library's front doors: :func:`prune` (one method, one target), ``search(spec, out=...)`` (a whole
search, returning its front as a DataFrame: :func:`autoprune.search.api.search`), :func:`load_search`,
:func:`save_base` and :func:`import_model` (a trained model becomes a base checkpoint),
:func:`load_pruned` (rebuild a saved pruned model) and the ``autoprune`` command line (import, search,
pareto, retrain).

User-facing warnings (no data for BN recalibration, LRF's fall-back to its weight fit) are
:class:`autoprune.errors.AutopruneWarning` through :mod:`warnings`; progress of long steps goes to the
reporter a caller installs (:mod:`autoprune.progress`, :mod:`autoprune.progress_view`).
"""
from __future__ import annotations

import logging

from . import search  # callable: autoprune.search(spec, out=...)
from .engine.plan import Plan, load_base, load_pruned, save_base
from .engine.pruning import PruneResult, prune
from .models.importing import import_model
from .search.api import SearchResult, load_search

__all__ = ["Plan", "PruneResult", "SearchResult", "import_model", "load_base", "load_pruned", "load_search", "prune",
           "save_base", "search"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
