"""The shared pruning engine: channel groups (graph, trace), costs, the allocator, plans and surgery,
BN recalibration, and :func:`autoprune.engine.pruning.prune` (one method, one target; also
``autoprune.prune``).

This ``__init__`` imports nothing: the methods (:mod:`autoprune.methods`) build on the engine's
lower modules, and :mod:`~autoprune.engine.pruning` builds on the methods, so re-exporting ``prune``
here would make ``autoprune.engine`` and ``autoprune.methods`` import each other.
"""
