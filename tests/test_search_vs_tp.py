"""The search-vs-Torch-Pruning benchmark's accounting: compute in epoch-equivalents, fronts, fidelity."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autoprune.benchmarks.search_vs_tp import best_at, epoch_equivalents, fidelity_rho, front_methods, hv


def row(number, method, state, acc, macs, epochs, prune_s, fidelity=None, feasible=None):
    feasible = state == "complete" if feasible is None else feasible
    return {"number": number, "method": method, "state": state, "val_acc": acc, "macs_frac": macs,
            "epochs_run": epochs, "prune_s": prune_s, "fidelity": fidelity, "feasible": str(feasible)}


def test_epoch_equivalents_count_screening_but_not_resrep_twice():
    assert epoch_equivalents(row(0, "l1", "complete", 0.9, 0.5, 3, 0.5), epoch_s=2.0) == 3.25
    assert epoch_equivalents(row(1, "fsm", "early_stopped", 0.5, 0.5, 0, 1.0), epoch_s=2.0) == 0.5  # screened out
    # ResRep's pruning time is its compactor epochs, already in epochs_run
    assert epoch_equivalents(row(2, "resrep", "complete", 0.9, 0.5, 3, 5.0), epoch_s=2.0) == 3.0
    assert epoch_equivalents(row(3, "l1", "failed", None, None, 0, ""), epoch_s=2.0) == 0.0


def test_fronts_use_only_complete_feasible_trials():
    rows = [row(0, "l1", "complete", 0.90, 0.5, 3, 0.1), row(1, "lrf", "complete", 0.95, 0.3, 3, 0.1),
            row(2, "fsm", "early_stopped", 0.99, 0.1, 1, 0.1), row(3, "resrep", "complete", 0.97, 0.6, 3, 0.1),
            row(4, "l1", "complete", 0.99, 0.2, 3, 0.1, feasible=False)]
    assert front_methods(rows) == {"lrf", "resrep"}
    # a far worse point a hair cheaper than another (same target) does not put its method on the front
    hair = [row(0, "lrf", "complete", 0.87, 0.2003, 3, 0.1), row(1, "l1", "complete", 0.81, 0.1995, 3, 0.1)]
    assert front_methods(hair) == {"lrf"} and front_methods(hair, tol=0.0) == {"lrf", "l1"}
    pts = np.array([[0.95, 0.3], [0.97, 0.6]])
    assert hv(pts) == pytest.approx(0.95 * (0.6 - 0.3) + 0.97 * (1 - 0.6))  # strips of MACs, best accuracy in each
    assert best_at(pts, 0.3) == 0.95 and best_at(pts, 0.2) is None and best_at(pts, 0.6) == 0.97


def test_fidelity_rank_correlation_needs_five_one_shot_trials():
    rows = [row(i, "l1", "complete", 0.8 + 0.01 * i, 0.5, 3, 0.1, fidelity=0.5 + 0.02 * i) for i in range(5)]
    rho, n = fidelity_rho(rows)
    assert rho == pytest.approx(1.0) and n == 5
    rows.append(row(9, "resrep", "complete", 0.1, 0.5, 3, 0.1, fidelity=0.99))  # after training: left out
    assert fidelity_rho(rows) == (pytest.approx(1.0), 5)
    assert math.isnan(fidelity_rho(rows[:4])[0])
