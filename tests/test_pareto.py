"""Tests for autoprune.report.pareto: Pareto masks, hypervolume and pick, on hand-made points."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from autoprune.errors import AutopruneError
from autoprune.report.pareto import front_hypervolume, front_mask, hypervolume_2d, pareto_mask, pick

MAXMIN = [True, False]  # accuracy up, MACs down


def test_pareto_mask_basic():
    pts = [(0.90, 30), (0.95, 50), (0.85, 30), (0.80, 10), (0.96, 80), (0.94, 60)]
    assert pareto_mask(pts, MAXMIN).tolist() == [True, True, False, True, True, False]


def test_ties_in_one_objective():
    # equal accuracy: fewer MACs wins; equal MACs: higher accuracy wins
    assert pareto_mask([(0.9, 10), (0.9, 20)], MAXMIN).tolist() == [True, False]
    assert pareto_mask([(0.9, 10), (0.95, 10)], MAXMIN).tolist() == [False, True]


def test_duplicates_are_kept_or_deduplicated_deterministically():
    pts = [(0.9, 10), (0.8, 5), (0.9, 10), (0.7, 20), (0.8, 5)]
    assert pareto_mask(pts, MAXMIN).tolist() == [True, True, True, False, True]
    assert pareto_mask(pts, MAXMIN, unique=True).tolist() == [True, True, False, False, False]


def test_nan_rows_are_never_on_the_front_and_do_not_dominate():
    pts = [(np.nan, 1), (0.9, 10), (0.99, np.nan), (0.8, 20)]
    assert pareto_mask(pts, MAXMIN).tolist() == [False, True, False, False]


@pytest.mark.parametrize("maximize, expected", [
    ([False, False], [True, True, True, False]),   # minimise both
    ([True, True], [False, False, False, True]),    # maximise both: (3, 3) beats (3, 1) on the tie
    ([True, False], [False, False, True, False]),   # max first, min second
    ([False, True], [True, False, False, False]),   # min first, max second: (1, 3) beats all
])
def test_mixed_directions(maximize, expected):
    pts = [(1, 3), (2, 2), (3, 1), (3, 3)]
    assert pareto_mask(pts, maximize).tolist() == expected


def test_three_objectives_and_empty_input():
    pts = [(1, 1, 1), (0, 2, 2), (1, 1, 2), (2, 2, 0)]
    assert pareto_mask(pts, [False, False, False]).tolist() == [True, True, False, True]
    assert pareto_mask(np.zeros((0, 2)), MAXMIN).tolist() == []
    with pytest.raises(ValueError):
        pareto_mask([(1, 2, 3)], MAXMIN)


def test_mask_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    pts = np.round(rng.random((60, 2)), 1)  # coarse grid: many ties and duplicates
    mask = pareto_mask(pts, MAXMIN)
    perm = rng.permutation(len(pts))
    assert (pareto_mask(pts[perm], MAXMIN) == mask[perm]).all()
    for i, j in itertools.product(np.flatnonzero(mask), range(len(pts))):  # nothing on the front is dominated
        assert not (pts[j, 0] >= pts[i, 0] and pts[j, 1] <= pts[i, 1] and
                    (pts[j, 0] > pts[i, 0] or pts[j, 1] < pts[i, 1]))


# --------------------------------------------------------------------------- hypervolume


def test_hypervolume_staircase_by_hand():
    # minimise both, reference (4, 4): union of [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4] = 3 + 2 + 1 = 6
    assert hypervolume_2d([(1, 3), (2, 2), (3, 1)], [False, False], (4, 4)) == pytest.approx(6.0)


def test_hypervolume_accuracy_vs_macs_fraction_by_hand():
    # [0,0.9]x[0.5,1] = 0.45 ; [0,0.8]x[0.3,1] = 0.56 ; overlap [0,0.8]x[0.5,1] = 0.40 -> 0.61
    assert hypervolume_2d([(0.9, 0.5), (0.8, 0.3)], MAXMIN, (0.0, 1.0)) == pytest.approx(0.61)
    # the same in the other orientation (min, max)
    assert hypervolume_2d([(0.5, 0.9), (0.3, 0.8)], [False, True], (1.0, 0.0)) == pytest.approx(0.61)
    # maximise both from reference (0, 0): [0,2]x[0,1] U [0,1]x[0,2] = 2 + 2 - 1 = 3
    assert hypervolume_2d([(2, 1), (1, 2)], [True, True], (0, 0)) == pytest.approx(3.0)


def test_hypervolume_ignores_dominated_duplicates_nan_and_points_beyond_reference():
    base = hypervolume_2d([(0.9, 0.5), (0.8, 0.3)], MAXMIN, (0.0, 1.0))
    noisy = [(0.9, 0.5), (0.8, 0.3), (0.9, 0.5), (0.7, 0.6), (np.nan, 0.1), (0.99, 1.2), (-0.1, 0.1)]
    assert hypervolume_2d(noisy, MAXMIN, (0.0, 1.0)) == pytest.approx(base)
    assert hypervolume_2d([], MAXMIN, (0.0, 1.0)) == 0.0
    assert hypervolume_2d([(0.5, 1.0)], MAXMIN, (0.0, 1.0)) == 0.0  # on the reference: no area


def _grid_hypervolume(pts: np.ndarray, ref: tuple[float, float]) -> float:
    """Exact area by coordinate compression (minimise both), an independent check."""
    xs = np.unique(np.append(pts[:, 0], ref[0]))
    ys = np.unique(np.append(pts[:, 1], ref[1]))
    area = 0.0
    for x0, x1 in itertools.pairwise(xs):
        for y0, y1 in itertools.pairwise(ys):
            if ((pts[:, 0] <= x0) & (pts[:, 1] <= y0)).any():
                area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_matches_brute_force(seed):
    pts = np.random.default_rng(seed).random((25, 2))
    assert hypervolume_2d(pts, [False, False], (1.0, 1.0)) == pytest.approx(_grid_hypervolume(pts, (1.0, 1.0)))


# --------------------------------------------------------------------------- trial tables and pick


def trials() -> pd.DataFrame:
    rows = [  # number, state, method, val_acc, macs, macs_frac, feasible
        (0, "complete", "resrep", 0.95, 500, 0.50, True),
        (1, "complete", "lrf", 0.90, 300, 0.30, True),
        (2, "complete", "l1", 0.90, 300, 0.30, True),     # exact duplicate of 1 (tie -> lower number)
        (3, "early_stopped", "fsm", 0.97, 200, 0.20, False),
        (4, "failed", "lrf", np.nan, 400, 0.40, False),
        (5, "complete", "l1", 0.70, 100, 0.10, False),   # infeasible
        (6, "complete", "fsm", 0.96, 800, 0.80, True),
        (7, "complete", "resrep", 0.96, 700, 0.70, True),  # same accuracy as 6, fewer MACs
        (8, "running", "resrep", np.nan, np.nan, np.nan, False),
    ]
    return pd.DataFrame(rows, columns=["number", "state", "method", "val_acc", "macs", "macs_frac", "feasible"])


def test_front_mask_of_a_trials_table():
    df = trials()
    assert df[front_mask(df)]["number"].tolist() == [0, 1, 2, 7]
    assert front_hypervolume(df) == pytest.approx(hypervolume_2d([(0.95, 0.5), (0.9, 0.3), (0.96, 0.7)], MAXMIN,
                                                                 (0.0, 1.0)))


def test_pick_best_and_tie_breaks():
    df = trials()
    assert pick(df, "best")["number"] == 7      # 0.96 at 700 MACs beats 0.96 at 800; 0.97 was early-stopped
    assert pick(df, "")["number"] == 7
    assert pick(df, "macs_frac<=0.5")["number"] == 0
    assert pick(df, "macs_frac<=30%")["number"] == 1  # exact tie of 1 and 2: the lower number
    assert pick(df, "macs<500,val_acc>=0.85")["number"] == 1
    assert pick(df, "val_acc>=0.95,min=macs")["number"] == 0
    assert pick(df, "max=macs")["number"] == 6
    assert pick(df, "trial=5")["number"] == 5   # named explicitly: infeasible is allowed


def test_pick_is_deterministic_under_row_order():
    df = trials()
    for seed in range(5):
        shuffled = df.sample(frac=1.0, random_state=seed)
        for rule in ("best", "macs_frac<=0.3", "val_acc>=0.9,min=macs"):
            assert pick(shuffled, rule)["number"] == pick(df, rule)["number"]


def test_pick_errors():
    df = trials()
    with pytest.raises(AutopruneError, match=r"unknown column 'flops'; columns: number, state, method"):
        pick(df, "flops<=0.3")
    with pytest.raises(AutopruneError) as info:
        pick(df, "macs_frac<=0.15")
    msg = str(info.value)
    assert "closest: trial 1 (macs_frac=0.3); trial 2 (macs_frac=0.3); trial 0 (macs_frac=0.5)" in msg
    assert "\n" not in msg
    with pytest.raises(AutopruneError, match="trial 4 is failed"):
        pick(df, "trial=4")
    with pytest.raises(AutopruneError, match="no trial 42"):
        pick(df, "trial=42")
    with pytest.raises(AutopruneError, match="is not COL<=X"):
        pick(df, "macs about 3")
    with pytest.raises(AutopruneError, match="not a number"):
        pick(df, "macs<=lots")
    with pytest.raises(AutopruneError, match="no complete feasible trial"):
        pick(df[df["state"] != "complete"], "best")


def test_pick_shorthands_from_the_issue_mean_fractions_and_val_acc():
    import pandas as pd

    from autoprune.report.pareto import pick

    df = pd.DataFrame({"number": [0, 1, 2], "state": ["complete"] * 3, "feasible": [True] * 3,
                       "val_acc": [0.97, 0.95, 0.99], "macs": [400_000, 600_000, 900_000],
                       "macs_frac": [0.4, 0.6, 0.9], "params": [10, 20, 30], "params_frac": [0.3, 0.6, 0.9]})
    assert int(pick(df, "macs_frac<=0.5")["number"]) == 0
    assert int(pick(df, "macs<=50%")["number"]) == 0
    assert int(pick(df, "macs<=0.5M")["number"]) == 0 and int(pick(df, "macs<=500K")["number"]) == 0
    assert int(pick(df, "macs<=0.7M")["number"]) == 0 and int(pick(df, "macs<=0.0005G")["number"]) == 0
    for bare in ("macs<=0.5", "params<0.5"):  # a fraction or a count? refused, naming both
        with pytest.raises(AutopruneError, match=r"_frac.*M for 0.5 million"):
            pick(df, bare)
    assert int(pick(df, "acc>=0.96,min=macs")["number"]) == 0
    assert int(pick(df, "macs<=700000")["number"]) == 0  # an absolute count stays absolute
    assert int(pick(df, "acc>=0.98")["number"]) == 2
