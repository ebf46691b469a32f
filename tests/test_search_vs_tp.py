"""The search-vs-Torch-Pruning benchmark: measured compute, fronts, 2-SE differences, the test column,
and one tiny end-to-end run on npz data with a given base."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoprune.benchmarks.search_vs_tp_runs import Side
from autoprune.benchmarks.search_vs_tp_tables import (
    _diff,
    _test_at,
    ablation_rows,
    best_at,
    fidelity_rho,
    front_methods,
    hv,
)


def row(number, method, state, acc, macs, epochs, prune_s, fidelity=None, feasible=None):
    feasible = state == "complete" if feasible is None else feasible
    return {"number": number, "method": method, "state": state, "val_acc": acc, "macs_frac": macs,
            "epochs_run": epochs, "prune_s": prune_s, "fidelity": fidelity, "feasible": str(feasible)}


def test_sides_count_measured_seconds_and_the_round():
    side = Side("x", rows=[{"val_acc": 0.9, "macs_frac": 0.5, "work_s": 2.0, "epochs": 3},
                           {"val_acc": None, "macs_frac": 0.3, "work_s": 0.5, "epochs": 0}], extra_work_s=1.0)
    assert side.work_s == 3.5 and side.epochs == 3
    assert side.points().tolist() == [[0.9, 0.5]]  # a trial without a result is no point


def test_differences_are_judged_against_two_standard_errors_and_test_follows_the_val_choice():
    assert _diff(0.60, 0.59, 3000).endswith("noise)") and _diff(0.60, 0.55, 3000).endswith("beyond 2 SE)")
    assert _diff(None, 0.5, 3000) is None
    side = Side("x", rows=[{"val_acc": 0.9, "macs_frac": 0.3, "test_acc": 0.80},
                           {"val_acc": 0.8, "macs_frac": 0.29, "test_acc": 0.85}])
    assert _test_at(side, 0.3) == 0.80  # chosen on validation, whatever the test says
    # a tie on validation: the cheaper point is the front's (the only one whose test accuracy is read)
    tie = Side("x", rows=[{"val_acc": 0.9, "macs_frac": 0.3}, {"val_acc": 0.9, "macs_frac": 0.2, "test_acc": 0.88}])
    assert _test_at(tie, 0.3) == 0.88


def test_ablation_rows_compare_each_seed_and_judge_the_mean_against_two_standard_errors():
    def side(acc):
        return Side("x", rows=[{"val_acc": acc, "macs_frac": 0.3}, {"val_acc": acc - 0.05, "macs_frac": 0.2}])

    results = [{"seed": s, "ours": side(0.80), "variants": {"no distillation": side(0.80 - d)}}
               for s, d in ((0, 0.020), (1, 0.022), (2, 0.021))]
    rows = ablation_rows(results, [0.2, 0.3], 3000)
    assert [r["seed"] for r in rows] == [0, 1, 2, "mean"]
    assert rows[0]["HV variant"] < rows[0]["HV as run"]
    mean = rows[-1]
    assert mean["<= 0.3"].startswith("-2.10 pts") and mean["<= 0.3"].endswith("beyond 2 SE)")
    # three seeds that agree do not shrink the SE below the binomial one: 1.1 points on 3000 images is noise
    close = [{"seed": s, "ours": side(0.80), "variants": {"v": side(0.80 - d)}} for s, d in ((0, 0.010), (1, 0.012), (2, 0.011))]
    assert ablation_rows(close, [0.3], 3000)[-1]["<= 0.3"].endswith("noise)")
    assert "one seed" in ablation_rows(close[:1], [0.3], 3000)[-1]["<= 0.3"]
    noisy = [{"seed": s, "ours": side(0.80), "variants": {"v": side(0.80 + d)}} for s, d in ((0, 0.01), (1, -0.01))]
    assert ablation_rows(noisy, [0.3], 3000)[-1]["<= 0.3"].endswith("noise)")


@pytest.mark.slow
def test_any_data_and_base(tmp_path, base_ckpt):
    """The benchmark end to end on an npz data set with a given base: every table, the commit in the header,
    the test column, and the screening round; tiny (digits as npz, 1 epoch, one criterion, two targets)."""
    from autoprune.benchmarks import search_vs_tp as bench
    from autoprune.data.datasets import DataSpec, load_data
    from autoprune.engine.plan import save_base
    from autoprune.models.registry import ModelSpec, create_model
    from autoprune.train import TrainConfig, fit

    digits = load_data(DataSpec("digits"))
    x = np.concatenate([digits.train.x, digits.val.x, digits.test.x]).astype(np.float32)
    y = np.concatenate([digits.train.y, digits.val.y, digits.test.y])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    case = bench.custom_case(f"npz:{tmp_path / 'd.npz'}", "small_cnn", None)
    data = load_data(case.data)
    spec = ModelSpec("small_cnn", data.num_classes, data.in_channels, data.image_size)
    torch.manual_seed(0)
    model = create_model(spec)
    fit(model, data.train, None, TrainConfig(epochs=3, lr=0.05, seed=0), "cpu")
    save_base(tmp_path / "base.pt", model, spec, case.data, {"val_acc": 0.0})
    assert bench.main(["--data", f"npz:{tmp_path / 'd.npz'}", "--base", str(tmp_path / "base.pt"), "--model",
                       "small_cnn", "--ft-subset", "0", "--seeds", "0", "--targets", "0.5", "0.3",
                       "--theirs", "tp magnitude", "tp bnscale", "--singles", "l1", "--rerun", "1",
                       "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "search_vs_tp_d_ftall.md").read_text()
    main_row = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert " | 0 (0 / " not in main_row  # the search ran trials within the sweep's measured seconds
    assert "commit" in md.lower() and "The fronts on the test split" in md and "screening round" in md
    assert "measured s (ours / TP sweep / singles)" in md
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


def test_a_rerun_sees_the_trials_finished_before_it_so_it_distils_as_the_trial_would_have():
    """Re-running trial 13 of the VGG-16-BN search to the end distilled two epochs where the trial itself,
    after trials that had reached the teacher, would not have distilled at all."""
    from types import SimpleNamespace

    from autoprune.benchmarks.search_vs_tp_runs import reference_before
    from autoprune.search.distillation import distillation
    from autoprune.search.store import StoredTrial

    trials = [StoredTrial(0, "complete", cost=0.5, curve=(0.87, 0.88, 0.8847)),
              StoredTrial(1, "early_stopped", cost=0.3, curve=(0.80,)),
              StoredTrial(2, "complete", cost=0.2, curve=(0.85,), record={"duplicate_of": 0}),
              StoredTrial(3, "complete", cost=0.2, curve=(0.86, 0.87)),
              StoredTrial(13, "complete", cost=0.2, curve=(0.9,))]
    store = SimpleNamespace(trials=lambda: trials, meta=dict)
    ref = reference_before(store, 13)
    assert [p.curve for p in ref.peers] == [(0.87, 0.88, 0.8847), (0.86, 0.87)] and ref.candidates == ()
    assert distillation(lambda: 0.8643, {"distill": 0.5}, lambda: ref, 13) == (0.0, None)
    # before any trial had reached the teacher, the re-run distils as the trial did
    assert distillation(lambda: 0.8643, {"distill": 0.5}, lambda: reference_before(store, 0), 0) == (0.5, 0.8643)


def test_reruns_skip_reused_results_and_put_epoch_stops_first():
    from autoprune.benchmarks.search_vs_tp_runs import stopped_to_rerun

    rows = [{"number": 1, "state": "early_stopped", "stopped_at": "screen"},
            {"number": 2, "state": "early_stopped", "stopped_at": "epoch 1"},
            {"number": 3, "state": "early_stopped", "stopped_at": "epoch 1", "duplicate_of": 2},
            {"number": 4, "state": "complete"}, {"number": 5, "state": "early_stopped", "stopped_at": "budget"}]
    assert [r["number"] for r in stopped_to_rerun(rows)] == [2, 1]
