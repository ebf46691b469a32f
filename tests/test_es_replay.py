"""The early-stopping replay applies the search's own rules to complete curves."""
from __future__ import annotations

import pytest

from autoprune.benchmarks.es_replay import Rules, Run, replay


def run(cost, acc_curve, fidelity):
    return Run(cost=cost, frac=cost / 1000, fidelity=fidelity, curve=tuple(acc_curve), phases=())


RUNS = [
    run(300.0, (0.80, 0.85, 0.88), 0.60),  # the first at its target: nothing to compare with, runs in full
    run(300.0, (0.50, 0.60, 0.70), 0.20),  # same target, far behind: screened out (min_peers 1), or stopped at epoch 1
    run(500.0, (0.85, 0.88, 0.90), 0.70),  # dearer and better: a new front point
]


def test_no_rules_runs_every_epoch():
    epochs, hv = replay(RUNS, Rules(keep=1.0, se_multiple=None), n_val=1000)
    assert epochs == 9
    assert hv == pytest.approx(0.88 * (0.5 - 0.3) + 0.90 * (1 - 0.5))


def test_each_rung_saves_the_dominated_trials_epochs_and_keeps_the_front():
    full = replay(RUNS, Rules(keep=1.0, se_multiple=None), n_val=1000)
    screened = replay(RUNS, Rules(keep=0.3, min_peers=1, se_multiple=None), n_val=1000)
    stopped = replay(RUNS, Rules(keep=1.0, se_multiple=1.0), n_val=1000)
    assert screened == (6, pytest.approx(full[1]))  # the second trial ran no epoch
    assert stopped == (7, pytest.approx(full[1]))  # it ran one epoch, then fell behind the cheaper peer


def test_a_folder_without_a_search_is_one_line(tmp_path, capsys):
    from autoprune.benchmarks.es_replay import main

    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study.db and spec.yaml" in err and str(tmp_path) in err
