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
import os
import sys


def _drop_working_directory() -> None:
    """Under ``python -m autoprune`` (``sys.argv[0]`` is "-m" while Python locates ``__main__``), take
    the current directory off the import path before anything else is imported, unless autoprune
    itself lives there (a source checkout). ``python -m`` puts it first on ``sys.path``, so a ``.py``
    file in a received results folder could otherwise shadow a library (``yaml.py``) or be imported
    by a model name; a user's own model package is found through PYTHONPATH or an installed package."""
    if sys.argv[:1] == ["-m"] and sys.path and sys.path[0] in ("", os.getcwd()):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.abspath(sys.path[0] or ".") != here:
            del sys.path[0]


_drop_working_directory()

from . import search  # callable: autoprune.search(spec, out=...)
from .engine.plan import Plan, load_base, load_pruned, save_base
from .engine.pruning import PruneResult, prune
from .models.importing import import_model
from .search.api import SearchResult, load_search

__all__ = ["Plan", "PruneResult", "SearchResult", "import_model", "load_base", "load_pruned", "load_search", "prune",
           "save_base", "search"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
