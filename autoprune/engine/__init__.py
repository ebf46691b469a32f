"""The shared pruning engine: channel groups (graph, trace), costs, the allocator, plans and surgery,
BN recalibration, and :func:`prune` (one method, one target)."""
from .pruning import PruneResult, prune

__all__ = ["PruneResult", "prune"]
