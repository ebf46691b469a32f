"""The two-objective early-stopping rule: a pure function over (cost, epoch, acc, finished curves)."""
from __future__ import annotations

import math

from autoprune.search.early_stop import peers_at, should_stop, threshold

# (cost, per-epoch val acc) of finished trials
FINISHED = [
    (100.0, [0.50, 0.70, 0.80]),
    (200.0, [0.60, 0.80, 0.90]),
    (300.0, [0.65, 0.85, 0.95]),
    (400.0, [0.70, 0.90, 0.97]),
]


def stop(cost, epoch, acc, finished=FINISHED, **kw):
    kw.setdefault("margin", 0.02)
    kw.setdefault("min_trials", 1)
    kw.setdefault("min_epochs", 1)
    return should_stop(cost, epoch, acc, finished, **kw)


def test_compares_only_with_cheaper_or_equal_trials():
    # cost 250: peers are the trials of cost 100 and 200; best at epoch 2 is 0.80 -> bar 0.78
    assert peers_at(250.0, 2, FINISHED) == [0.70, 0.80]
    assert threshold(250.0, 2, FINISHED, margin=0.02, min_trials=1) == 0.80 - 0.02
    assert stop(250.0, 2, 0.77)
    assert not stop(250.0, 2, 0.79)
    # the far more accurate but more expensive trials (0.90 at epoch 2) do not count
    assert not stop(250.0, 2, 0.85)
    # equal cost counts as "no more MACs"
    assert peers_at(200.0, 1, FINISHED) == [0.50, 0.60]


def test_uses_the_same_epoch_of_the_peers():
    # epoch 1 bar for cost 250: max(0.50, 0.60) - 0.02 = 0.58
    assert stop(250.0, 1, 0.57, total_epochs=3)
    assert not stop(250.0, 1, 0.59, total_epochs=3)
    # the same accuracy at epoch 3 is far behind (bar 0.88)
    assert stop(500.0, 2, 0.59)


def test_cheapest_trial_is_never_stopped():
    assert not stop(50.0, 2, 0.0)
    assert peers_at(50.0, 2, FINISHED) == []


def test_needs_min_trials_peers():
    # cost 150 has one peer (cost 100)
    assert stop(150.0, 2, 0.5, min_trials=1)
    assert not stop(150.0, 2, 0.5, min_trials=2)
    assert stop(250.0, 2, 0.5, min_trials=2)
    assert not stop(250.0, 2, 0.5, min_trials=3)


def test_min_epochs_and_last_epoch():
    assert not stop(450.0, 1, 0.1, min_epochs=2)
    assert stop(450.0, 2, 0.1, min_epochs=2)
    assert not stop(450.0, 3, 0.1, total_epochs=3)  # stopping at the last epoch saves nothing
    assert stop(450.0, 2, 0.1, total_epochs=3)


def test_margin():
    assert not stop(450.0, 2, 0.89, margin=0.02)  # bar 0.88
    assert stop(450.0, 2, 0.87, margin=0.02)
    assert not stop(450.0, 2, 0.87, margin=0.05)  # bar 0.85


def test_short_or_partial_curves_are_skipped():
    finished = [(100.0, [0.9]), (100.0, [None, None, 0.9]), (100.0, [float("nan"), 0.5])]
    # epoch 2: only the third trial measured it (0.5); the first is too short, the second has None
    assert peers_at(200.0, 2, finished) == [0.5]
    # epoch 1: 0.9 from the first; None and NaN are skipped
    assert peers_at(200.0, 1, finished) == [0.9]
    assert not stop(200.0, 2, 0.1, finished=finished, min_trials=2)


def test_nan_accuracy_stops_once_peers_exist():
    assert stop(450.0, 2, math.nan)
    assert not stop(50.0, 2, math.nan)  # no peer: nothing to compare with


def test_no_finished_trials():
    assert not stop(100.0, 1, 0.0, finished=[])
    assert threshold(100.0, 1, [], min_trials=1) is None
