"""The TrialStore contract: the same assertions over the Optuna and the Ray implementation.

Budget, early-stopping reference, trials.csv rows, parameter importance and the resumed sampler seed
are computed once, in autoprune.search.store, from what a store lists; each backend only has to keep
its trials. Neither implementation needs Ray installed (the Ray store is plain JSON files).
"""
from __future__ import annotations

import time

import optuna
import pytest

from autoprune.search.early_stop import Peer
from autoprune.search.optuna_backend import OptunaStore
from autoprune.search.ray_store import RayStore
from autoprune.search.results import INTERRUPTED, TrialResult, make_row
from autoprune.search.store import Limits, budget_reason, finished_curves, importance, rows, write_rows
from autoprune.search.study import storage

CONSTRAINTS = ("max_macs_frac",)


class OptunaImpl:
    name = "optuna"

    def __init__(self, tmp_path):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = storage(tmp_path)
        optuna.create_study(study_name="s", storage=self.url, directions=["maximize", "minimize"])

    def open(self, run: int) -> OptunaStore:  # a new run = a new process on the same study.db
        study = optuna.load_study(study_name="s", storage=self.url, sampler=optuna.samplers.RandomSampler(seed=run))
        self.study = study
        return OptunaStore(study, CONSTRAINTS)

    def ask(self) -> optuna.Trial:
        return self.study.ask()


class RayImpl:
    name = "ray"

    def __init__(self, tmp_path):
        self.out = tmp_path
        self.searcher = optuna.create_study(directions=["maximize", "minimize"],  # as Ray's OptunaSearch holds
                                            sampler=optuna.samplers.RandomSampler(seed=0))  # seeded: no flaky draws

    def open(self, run: int) -> RayStore:
        return RayStore(self.out, run_id=f"run_{run:03d}")

    def ask(self) -> optuna.Trial:
        return self.searcher.ask()


@pytest.fixture(params=[OptunaImpl, RayImpl], ids=["optuna", "ray"])
def impl(request, tmp_path):
    return request.param(tmp_path)


def hparams(target: float = 0.5, allocation: str = "global") -> dict:
    return {"method": "l1", "target": target, "allocation": allocation, "epochs": 2, "lr": 0.01, "batch_size": 32}


def result(number: int, state: str, hp: dict, acc: float = 0.9, cost: float = 50.0, error: str = "") -> TrialResult:
    done = state in ("complete", "early_stopped")
    return TrialResult(
        number=number, state=state, hparams=hp, val_acc=acc if done else None, macs=int(cost) if done else None,
        macs_frac=cost / 100 if done else None, params=10 if done else None, params_frac=0.5 if done else None,
        epochs_run=2 if state == "complete" else 1, duration_s=2.5, constraints=(cost / 100 - 0.6,) if done else (),
        error=error, model=f"models/trial_{number:04d}.pt" if state == "complete" else "",
        curve=(acc - 0.1, acc) if state == "complete" else (acc - 0.1,), cost=cost if done else None)


def test_claim_record_rows_curves_and_budget(impl, tmp_path):
    store = impl.open(0)
    numbers = [store.claim(hparams(0.3 + 0.1 * i), impl.ask()) for i in range(4)]
    assert numbers == [0, 1, 2, 3]
    assert [t.state for t in store.trials()] == ["running"] * 4
    outcomes = [result(0, "complete", hparams(0.3), 0.9, 30.0), result(1, "early_stopped", hparams(0.4), 0.7, 40.0),
                result(2, "failed", hparams(0.5), error="ValueError: boom")]
    for r in outcomes:
        store.record(r.number, r)
    table = rows(store)
    assert [r["state"] for r in table] == ["complete", "early_stopped", "failed", "running"]
    assert table[0] == make_row(0, "complete", hparams(0.3), outcomes[0].record())
    assert table[0]["feasible"] is True and table[0]["model"] == "models/trial_0000.pt"
    assert table[2]["error"] == "ValueError: boom" and table[3]["error"] == ""
    # only complete trials are the early-stopping reference (never an early-stopped trial's partial curve)
    assert finished_curves(store).peers == (Peer(30.0, (0.8, 0.9)),)
    assert budget_reason(store, Limits(max_trials=4)) == "max_trials"
    assert budget_reason(store, Limits(max_trials=5)) is None
    assert budget_reason(store, Limits(deadline=time.time() - 1)) == "time"
    assert budget_reason(store, Limits(device_seconds=3 * 2.5 + 3600)) is None
    assert budget_reason(store, Limits(device_seconds=3 * 2.5)) == "device_hours"
    assert (tmp_path / "trials.csv").exists() is False
    assert write_rows(store, tmp_path) == table and (tmp_path / "trials.csv").read_text().count("\n") == 5


def test_a_trial_left_running_is_interrupted_uncounted_and_meta_survives(impl):
    first = impl.open(0)
    first.set_meta("base", {"weights": "abc", "split": "def"})
    first.claim(hparams(0.3), impl.ask())
    first.record(0, result(0, "complete", hparams(0.3)))
    first.claim(hparams(0.4), impl.ask())  # the process dies here
    second = impl.open(1)
    assert second.recover() == [1]
    t = second.trials()[1]
    assert t.state == "failed" and t.interrupted
    assert rows(second)[1]["error"] == INTERRUPTED and rows(second)[1]["feasible"] is False
    assert budget_reason(second, Limits(max_trials=2)) is None  # the interrupted trial does not count
    assert second.claim(hparams(0.5), impl.ask()) == 2
    assert budget_reason(second, Limits(max_trials=2)) == "max_trials"
    assert second.meta()["base"] == {"weights": "abc", "split": "def"}


def test_importance_from_either_store(impl):
    store = impl.open(0)
    assert importance(store, ("val_acc", "macs")) == {}  # nothing complete yet
    for i in range(12):  # fANOVA needs report_importance.MIN_TRIALS (10) complete trials
        trial = impl.ask()
        target = trial.suggest_float("target", 0.1, 0.9)
        allocation = trial.suggest_categorical("allocation", ["uniform", "global"])
        hp = hparams(target, allocation)
        n = store.claim(hp, trial)
        store.record(n, result(n, "complete", hp, acc=0.5 + 0.5 * target, cost=100 * target))
    imp = importance(store, ("val_acc", "macs"))
    assert set(imp) == {"val_acc", "macs"}
    for values in imp.values():
        assert set(values) == {"target", "allocation"}
        assert values["target"] > values["allocation"] and sum(values.values()) == pytest.approx(1.0)
