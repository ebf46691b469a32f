"""The Ray backend's trials (files under <out>/ray) become an Optuna study.db that optuna-dashboard
opens like the Optuna backend's: named objectives, the trials with their values, and the curves."""
from __future__ import annotations

from pathlib import Path

import optuna

from autoprune.search import space
from autoprune.search.ray_store import RayStore
from autoprune.search.ray_study_db import write_study_db
from autoprune.search.results import TrialResult
from autoprune.search.spec import load_spec

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def test_ray_trials_become_a_dashboard_study(tmp_path):
    spec = load_spec(SMOKE)
    store = RayStore(tmp_path, "run_000")
    ask = optuna.create_study(directions=["maximize", "minimize"])  # what Ray's OptunaSearch holds
    outcomes = [("complete", 0.9, (0.5, 0.8, 0.9)), ("early_stopped", 0.4, (0.3, 0.4)), ("complete", 0.8, (0.8,))]
    for state, acc, curve in outcomes:
        trial = ask.ask()
        hparams = space.suggest(trial, spec)
        number = store.claim(hparams, trial)
        store.record(number, TrialResult(number=number, state=state, hparams=hparams, val_acc=acc, macs=1000 + number,
                                         curve=curve, cost=1000.0 + number))
    path = write_study_db(spec, tmp_path, store)
    storage = f"sqlite:///{path}"
    study = optuna.load_study(study_name="smoke", storage=storage)
    assert study.metric_names == ["val_acc", "macs"] and study.user_attrs["backend"] == "ray"
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[0].values == [0.9, 1000.0] and study.trials[0].params
    curves = optuna.load_study(study_name="smoke.curves", storage=storage).trials
    assert [dict(t.intermediate_values) for t in curves] == [{1: 0.5, 2: 0.8, 3: 0.9}, {1: 0.3, 2: 0.4}, {1: 0.8}]
    assert [t.user_attrs["search_trial"] for t in curves] == [0, 1, 2]
    write_study_db(spec, tmp_path, store)  # rewritten after every run, never appended twice
    assert len(optuna.load_study(study_name="smoke", storage=storage).trials) == 3
