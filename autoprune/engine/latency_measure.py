"""End-to-end latency of whole models against a reference, each timed in its own pair with it.

:func:`measure_models` times ``models[0]`` (the reference, usually the unpruned base) and each other
model in interleaved rounds (warm-up first, medians; see :func:`.latency_table.time_runners`), one pair
at a time. A model's latency is read as its ratio to the reference in the same round (the median over
rounds), times the reference's median latency over all pairs.

Why pairs: timing many models in one interleaved set cycles all of their weights through the caches,
which a model running alone never does. On this project's 2-core VM, ResNet-50 (224, batch 1, one
thread) pruned to random widths measured 0.957 / 0.855 / 0.527 of the base among 30 other pruned
copies, and 0.882 / 0.804 / 0.483 (again: 0.884 / 0.813 / 0.473) in pairs, where the latency model
predicted 0.884 / 0.795 / 0.474. A per-round ratio also cancels the machine's drift in speed, which
on a shared VM moves the base's own latency by 10-30 % within minutes.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

from torch import nn

from .. import progress
from .latency_table import LatencyConfig, make_runner, time_runners


def measure_models(models: Sequence[nn.Module], input_shape: Sequence[int], cfg: LatencyConfig,
                   name: str = "latency end-to-end") -> list[float]:
    """Latency in ms per forward (batch ``cfg.batch_size``, ``cfg.runtime``, ``cfg.n_threads``) of each of
    ``models``; ``models[0]`` is the reference, measured with every other one.

    Returns one value per model: for ``models[0]`` the median of its timings over all pairs; for each other
    model the median over rounds of (its time / the reference's time in the same round) x that value. One
    model alone is timed alone. Each pair runs ``cfg.rounds`` rounds of loops of about
    ``max(cfg.budget_s, 0.1)`` seconds per model; announces progress through :mod:`autoprune.progress`.
    """
    if not models:
        return []
    budget = max(cfg.budget_s, 0.1)
    if len(models) == 1:
        with progress.phase(name, total=cfg.rounds, unit="round") as p:
            return [time_runners([make_runner(models[0], input_shape, cfg)], cfg, budget_s=budget,
                                 on_round=p.advance)[0].ms]
    ref = make_runner(models[0], input_shape, cfg)
    ref_ms: list[float] = []
    ratios: list[float] = []
    with progress.phase(name, total=cfg.rounds * (len(models) - 1), unit="round") as p:
        for model in models[1:]:
            base, other = time_runners([ref, make_runner(model, input_shape, cfg)], cfg, budget_s=budget,
                                       on_round=p.advance)
            ref_ms.append(base.ms)
            per_round = [o / b for o, b in zip(other.rounds, base.rounds) if b > 0]
            ratios.append(statistics.median(per_round) if per_round else other.ms / max(base.ms, 1e-9))
    base_ms = statistics.median(ref_ms)
    return [base_ms, *(r * base_ms for r in ratios)]


__all__ = ["measure_models"]
