"""Parameter importance per objective: fANOVA on a synthetic study whose answer is known."""
from __future__ import annotations

import random

import optuna
import pytest

from autoprune.report.importance import MIN_TRIALS, by_construction, param_importance
from autoprune.report.tables import _importance_md, spearman


def synthetic_trials(n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """``lr`` drives accuracy, ``target`` drives MACs, ``noise`` drives nothing."""
    rng = random.Random(seed)
    dists = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True),
             "target": optuna.distributions.FloatDistribution(0.1, 0.9),
             "noise": optuna.distributions.FloatDistribution(0.0, 1.0),
             "allocation": optuna.distributions.CategoricalDistribution(["uniform", "global"])}
    out = []
    for _ in range(n):
        p = {"lr": 10 ** rng.uniform(-3, -1), "target": rng.uniform(0.1, 0.9), "noise": rng.random(),
             "allocation": rng.choice(["uniform", "global"])}
        acc = 0.95 - 0.3 * abs(p["lr"] - 0.01) / 0.09 + rng.gauss(0, 0.002)  # best at lr 0.01
        macs = 1e6 * p["target"] * (1 + rng.gauss(0, 0.002))
        out.append(optuna.trial.create_trial(params=p, distributions=dists, values=[acc, macs]))
    return out


def test_each_objective_names_the_parameter_that_drives_it():
    imp = param_importance(synthetic_trials(40), ("val_acc", "macs"), ("maximize", "minimize"))
    assert set(imp) == {"val_acc", "macs"}
    assert max(imp["val_acc"], key=imp["val_acc"].get) == "lr"
    assert max(imp["macs"], key=imp["macs"].get) == "target"
    assert imp["macs"]["target"] > 0.8 and imp["val_acc"]["lr"] > 0.5
    for values in imp.values():
        assert sum(values.values()) == pytest.approx(1.0)
        assert values["noise"] < 0.1


def test_the_direction_does_not_change_the_answer():
    trials = synthetic_trials(30)
    a = param_importance(trials, ("val_acc", "macs"), ("maximize", "minimize"))
    b = param_importance(trials, ("val_acc", "macs"), ("minimize", "maximize"))
    assert set(a) == set(b) and all(a[k] == pytest.approx(b[k]) for k in a)


def test_not_enough_complete_trials_gives_no_table():
    assert param_importance(synthetic_trials(MIN_TRIALS - 1), ("val_acc", "macs"), ("maximize", "minimize")) == {}
    import pandas as pd

    df = pd.DataFrame({"state": ["complete"] * 3, "macs": [1.0, 2.0, 3.0], "target": [0.1, 0.2, 0.3]})
    md = _importance_md(df, {}, "macs")
    assert "Not enough trials: 3 complete" in md and str(MIN_TRIALS) in md


def test_a_parameter_that_sets_an_objective_by_construction_is_named():
    import pandas as pd

    trials = synthetic_trials(20)
    df = pd.DataFrame([{**t.params, "state": "complete", "val_acc": t.values[0], "macs": t.values[1]} for t in trials])
    assert by_construction({"target": df["target"], "lr": df["lr"]}, df["macs"]) == ["target"]
    imp = param_importance(trials, ("val_acc", "macs"), ("maximize", "minimize"))
    md = _importance_md(df, imp, "macs")
    assert "fANOVA" in md and "`target` sets macs by construction" in md
    assert "variance explained" not in md.lower().replace("explains", "")


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # NaN: constant side
