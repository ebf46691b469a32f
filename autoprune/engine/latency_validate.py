"""How good a latency model is: its error on random held-out width assignments, measured end to end.

:func:`validate` draws random width assignments (none used to fit the model: the fit uses uniform
widths), times each pruned copy against the base in its own pair of interleaved rounds
(:func:`.latency_measure.measure_models`), and reports the median and 90th-percentile relative error
of the predicted latency and Spearman's rank correlation.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .graph import ChannelGroup
from .latency import LatencyModel, measure_models, pruned_copy
from .latency_table import LatencyConfig


def random_widths(groups: Sequence[ChannelGroup], rng: random.Random) -> dict[str, int]:
    """A random assignment: an overall fraction in [0.2, 1], each group jittered by x0.7..1.3 (odd widths
    included, nothing rounded)."""
    f = rng.uniform(0.2, 1.0)
    return {g.name: min(g.channels, max(1, round(g.channels * f * rng.uniform(0.7, 1.3))))
            for g in groups if g.prunable}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / den if den > 0 else float("nan")


@dataclass(frozen=True)
class Validation:
    """Error of the latency model on held-out random width assignments (measured end to end)."""

    n: int
    median_rel_err: float  # |predicted - measured| / measured, ms
    p90_rel_err: float
    spearman: float
    median_frac_err: float  # the same on fractions of the base measured in the same pair
    predicted_ms: tuple[float, ...] = ()
    measured_ms: tuple[float, ...] = ()
    others_median_rel_err: Mapping[str, float] = field(default_factory=dict)  # the same, for ``others``
    others_median_frac_err: Mapping[str, float] = field(default_factory=dict)


def _quantile(v: Sequence[float], q: float) -> float:
    s = sorted(v)
    pos = q * (len(s) - 1)
    i = int(pos)
    return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (pos - i)


def validate(model: nn.Module, groups: Sequence[ChannelGroup], lm: LatencyModel, input_shape: Sequence[int],
             cfg: LatencyConfig, n: int = 30, seed: int = 1234,
             others: Mapping[str, LatencyModel] | None = None) -> Validation:
    """Measure ``n`` random width assignments (each in a pair with the base) and compare with ``lm``; each
    of ``others`` (other latency models of the same model, e.g. an ablation) is scored on the same
    timings."""
    rng = random.Random(seed)
    assignments = [random_widths(groups, rng) for _ in range(n)]
    models = [model.eval()]
    models += [pruned_copy(model, groups, w) for w in assignments]
    measured = measure_models(models, input_shape, cfg, "latency validation")
    predicted = [lm.value(w) for w in assignments]
    rel = [abs(p - m) / m for p, m in zip(predicted, measured[1:])]
    frac = [abs(p / lm.base - m / measured[0]) / (m / measured[0]) for p, m in zip(predicted, measured[1:])]
    theirs = {k: ([o.value(w) for w in assignments], o.base) for k, o in (others or {}).items()}
    alt = {k: statistics.median(abs(p - m) / m for p, m in zip(ps, measured[1:])) for k, (ps, _) in theirs.items()}
    alt_frac = {k: statistics.median(abs(p / b - m / measured[0]) / (m / measured[0]) for p, m in zip(ps, measured[1:]))
                for k, (ps, b) in theirs.items()}
    return Validation(n=n, median_rel_err=statistics.median(rel), p90_rel_err=_quantile(rel, 0.9),
                      spearman=spearman(predicted, measured[1:]), median_frac_err=statistics.median(frac),
                      predicted_ms=tuple(predicted), measured_ms=tuple(measured[1:]), others_median_rel_err=alt,
                      others_median_frac_err=alt_frac)


