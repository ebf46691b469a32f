"""Early stopping that respects both objectives (DESIGN.md section 5).

Optuna's pruners refuse multi-objective studies and a scalar scheduler would compare a small
model with a large one. But a pruned model's cost (MACs, params or latency) is known before its
fine-tuning starts, so a trial only has to keep up with the trials that are at least as cheap:

    at epoch e >= min_epochs, stop the trial if its validation accuracy is below
    max(accuracy at epoch e of the finished trials whose cost <= this trial's cost) - margin,
    provided at least ``min_trials`` such finished trials reached epoch e.

A trial that falls behind something cheaper by more than the margin is on its way to being
dominated; a trial cheaper than everything finished is never stopped (nothing to compare with),
so the low-cost end of the front is always explored. The final epoch is never a stopping point:
stopping there saves nothing and would hide a finished result.

Curves are indexed by the trial's epoch (1-based: ``curve[e - 1]`` is the accuracy after epoch e);
an entry may be ``None`` where the trial did not measure it. A training-time method (ResRep) is
measured during its pruning epochs too, as the model it would return at that point (its mask
applied), from the epoch its masked rows have been driven to zero; earlier entries are ``None``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Curve = Sequence["float | None"]


def peers_at(cost: float, epoch: int, finished: Iterable[tuple[float, Curve]]) -> list[float]:
    """Accuracies at ``epoch`` of the finished trials with cost <= ``cost`` that measured it."""
    out = []
    for peer_cost, curve in finished:
        if peer_cost is None or not peer_cost <= cost or len(curve) < epoch:
            continue
        acc = curve[epoch - 1]
        if acc is not None and math.isfinite(acc):
            out.append(float(acc))
    return out


def threshold(cost: float, epoch: int, finished: Iterable[tuple[float, Curve]], margin: float = 0.02,
              min_trials: int = 3) -> float | None:
    """The accuracy a trial must reach at ``epoch`` to continue, or None when there is no rule yet."""
    peers = peers_at(cost, epoch, finished)
    if len(peers) < max(1, min_trials):
        return None
    return max(peers) - margin


def should_stop(cost: float, epoch: int, acc: float, finished: Iterable[tuple[float, Curve]], *,
                margin: float = 0.02, min_epochs: int = 1, min_trials: int = 3,
                total_epochs: int | None = None) -> bool:
    """True when a trial of ``cost`` with accuracy ``acc`` after ``epoch`` should stop now.

    ``finished`` holds ``(cost, curve)`` of COMPLETED trials only (never early-stopped or failed
    ones: their curves end early or mean nothing). ``total_epochs`` is this trial's epoch count;
    its last epoch is never a stopping point. A non-finite accuracy stops the trial once peers
    exist (NaN compares false everywhere, so it is handled explicitly).
    """
    if epoch < min_epochs or (total_epochs is not None and epoch >= total_epochs):
        return False
    bar = threshold(cost, epoch, finished, margin=margin, min_trials=min_trials)
    if bar is None:
        return False
    return not math.isfinite(acc) or acc < bar
