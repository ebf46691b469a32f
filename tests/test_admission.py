"""Budget admission (search/admission.py): the work model of finished trials, and a search that does not
start a trial the compute budget left cannot pay for."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_search import write_spec

from autoprune.search import admission
from autoprune.search.results import NOT_STARTED
from autoprune.search.runner import run_search
from autoprune.search.spec import load_spec
from autoprune.search.store import Limits, StoredTrial, budget_reason

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeStore:
    """The two calls admission makes of a store."""

    def __init__(self, trials, round_work_s=0.0):
        self._trials = list(trials)
        self._meta = {"round_work_s": round_work_s}

    def trials(self):
        return list(self._trials)

    def meta(self):
        return dict(self._meta)


def done(number, method, target, work, epochs=3, distilled=0, state="complete", **record):
    hp = {"method": method, "target": target, "epochs": epochs, "lr": 0.01, "allocation": "global"}
    rec = {"work_s": work, "epochs_run": epochs, "distill_epochs": distilled, **record}
    return StoredTrial(number=number, state=state, hparams=hp, record=rec if state != "running" else {})


@pytest.fixture()
def spec(base_ckpt, tmp_path):
    return load_spec(write_spec(tmp_path, base_ckpt, space={
        "method": ["l1", "resrep"], "target": {"low": 0.2, "high": 0.8}, "allocation": "global", "epochs": 3,
        "lr": 0.01}))


def test_width_epochs_counts_training_epochs_at_full_width_and_fine_tune_epochs_at_the_target(spec):
    hp = {"method": "l1", "target": 0.3, "epochs": 3, "lr": 0.01}
    assert admission.width_epochs(spec, hp) == ("l1", pytest.approx(0.9))
    # a distillation weight: every fine-tune epoch with the teacher unless told how many ran with it
    assert admission.width_epochs(spec, {**hp, "distill": 0.5})[1] == pytest.approx(0.9 + 3 * admission.TEACHER_SHARE)
    assert admission.width_epochs(spec, {**hp, "distill": 0.5}, distilled=1)[1] == pytest.approx(
        0.9 + admission.TEACHER_SHARE)
    # ResRep trains with compactors for train_share (default 1) of the epochs: the full-width model
    assert admission.width_epochs(spec, {**hp, "method": "resrep"}) == ("resrep", pytest.approx(3.0))
    assert admission.width_epochs(spec, {**hp, "method": "resrep", "resrep.train_share": 0.34})[1] == \
        pytest.approx(1 + 2 * 0.3)


def test_the_work_model_recovers_a_linear_cost_and_scales_a_method_by_its_own_trials(spec):
    trials = [done(i, "l1", t, 40 + 400 * 3 * t) for i, t in enumerate((0.5, 0.3, 0.2))]
    model = admission.fit(spec, trials)
    assert model.intercept == pytest.approx(40) and model.slope == pytest.approx(400)
    assert model.predict("resrep", 3.0) == pytest.approx(1240)  # no ResRep trial yet: the plain fit
    # a ResRep trial that cost 1.5x the fit scales later ResRep predictions, not l1's
    model = admission.fit(spec, trials + [done(3, "resrep", 0.2, 1.5 * 1240)])
    assert model.predict("resrep", 3.0) == pytest.approx(1.5 * 1240, rel=0.05)
    assert model.predict("l1", 0.9) == pytest.approx(400, rel=0.05)
    # evidence is complete trials that ran every epoch, not reused ones, not screened-out ones
    noise = [done(4, "l1", 0.5, 1e6, state="early_stopped"), done(5, "l1", 0.5, 1e6, duplicate_of=0),
             done(6, "l1", 0.5, 1e6, epochs=3, epochs_run=1)]
    assert admission.fit(spec, trials + noise).slope == pytest.approx(400)
    assert admission.fit(spec, []) is None
    one = admission.fit(spec, trials[:1])  # one width: proportional
    assert one.intercept == 0 and one.predict("l1", 1.5) == pytest.approx(trials[0].record["work_s"])


def test_a_distilling_trial_is_predicted_with_the_share_of_epochs_finished_trials_distilled(spec):
    plain = [done(i, "l1", t, 40 + 400 * 3 * t) for i, t in enumerate((0.5, 0.3, 0.2))]
    model = admission.fit(spec, plain)
    new = {"method": "l1", "target": 0.3, "epochs": 3, "lr": 0.01, "distill": 0.5}
    teacher = 400 * admission.TEACHER_SHARE  # one distilled epoch's seconds under this model
    assert admission.predict(spec, model, plain, new) == pytest.approx(400 + 3 * teacher)  # no evidence: all 3
    taught = {"distill": 0.5}
    all3 = [StoredTrial(9, "complete", {**plain[0].hparams, **taught}, {**plain[0].record, "distill_epochs": 3})]
    one_of_3 = [StoredTrial(9, "complete", {**plain[0].hparams, **taught}, {**plain[0].record, "distill_epochs": 1}),
                StoredTrial(10, "complete", {**plain[1].hparams, **taught}, {**plain[1].record, "distill_epochs": 0})]
    assert admission.predict(spec, model, plain + all3, new) == pytest.approx(400 + 3 * teacher)
    assert admission.predict(spec, model, plain + one_of_3, new) == pytest.approx(400 + teacher / 2)
    # a reused result or an early-stopped trial is not evidence of the share (a reuse would count twice)
    reuse = StoredTrial(11, "complete", {**plain[0].hparams, **taught}, {**plain[0].record, "distill_epochs": 3,
                                                                         "duplicate_of": 9})
    stopped = StoredTrial(12, "early_stopped", {**plain[0].hparams, **taught}, {**plain[0].record, "distill_epochs": 0})
    assert admission.predict(spec, model, plain + one_of_3 + [reuse, stopped], new) == pytest.approx(400 + teacher / 2)
    assert admission.predict(spec, model, plain, {**new, "distill": 0.0}) == pytest.approx(400)


def test_admission_refuses_a_trial_that_does_not_fit(spec):
    trials = [done(i, "l1", t, 40 + 400 * 3 * t) for i, t in enumerate((0.5, 0.3, 0.2))]
    used = sum(t.record["work_s"] for t in trials) + 100.0  # the screening round's 100 s included
    resrep = {"method": "resrep", "target": 0.2, "epochs": 3, "lr": 0.01}
    store = FakeStore(trials + [done(3, "resrep", 0.2, 0, state="running")], round_work_s=100.0)
    fits, predicted, left = admission.admit(spec, store, resrep, used + 1000.0)
    assert not fits and predicted == pytest.approx(1240) and left == pytest.approx(1000.0)
    assert admission.admit(spec, store, resrep, used + 1300.0)[0]
    assert admission.admit(spec, FakeStore([]), resrep, 1.0) == (True, None, 1.0)  # no evidence: starts
    assert admission.admit(spec, store, resrep, None)[0]  # no compute budget: always
    # the cheapest configuration (l1, 3 epochs at target 0.2: x 0.6, 280 s) decides when the budget is spent
    assert admission.stop_reason(spec, FakeStore(trials, 100.0), used + 281.0) is None
    assert admission.stop_reason(spec, FakeStore(trials, 100.0), used + 279.0) == "compute"


def test_the_cheapest_configuration_looks_at_the_method_parameters_the_space_allows(base_ckpt, tmp_path):
    """A ResRep-only space whose train_share reaches 0.34: one compactor epoch of 3, not the default's 3."""
    resrep_only = load_spec(write_spec(tmp_path, base_ckpt, space={
        "method": "resrep", "target": [0.5, 0.2], "allocation": "global", "epochs": 3, "lr": 0.01,
        "methods": {"resrep": {"train_share": {"low": 0.34, "high": 1.0}}}}))
    model = admission.WorkModel(0.0, 100.0, {})
    assert admission.cheapest(resrep_only, model) == pytest.approx(100.0 * (1 + 2 * 0.2))


def test_a_worker_stops_after_proposals_in_a_row_that_ran_nothing():
    assert admission.idle_reason(0, admission.MAX_SKIPS, 25) == "compute"
    assert admission.idle_reason(25, 0, 25) == "exhausted"
    assert admission.idle_reason(20, 5, 25) == "compute"  # reused and skipped alternating: still stops
    assert admission.idle_reason(24, 0, 25) is None and admission.idle_reason(3, 3, 25) is None


def test_a_trial_not_started_for_lack_of_budget_costs_nothing_and_no_max_trials(spec):
    skipped = StoredTrial(number=0, state="early_stopped", hparams={},
                          record=admission.skipped_result(spec, 0, {"method": "l1"}, 900.0, 10.0).record())
    assert skipped.record["stopped_at"] == NOT_STARTED and skipped.record["work_s"] == 0.0
    assert budget_reason(FakeStore([skipped]), Limits(max_trials=1)) is None


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_search_skips_what_the_budget_cannot_pay_for_and_runs_what_fits(base_ckpt, tmp_path, monkeypatch):
    """Trial 1 is predicted not to fit: recorded early-stopped at 'budget' with no work, not counted against
    max_trials (three trials still run); the search's trials.csv says so."""
    real = admission.admit

    def second_too_big(spec, store, hparams, limit_s):
        fits, predicted, left = real(spec, store, hparams, limit_s)
        second = len([t for t in store.trials() if t.state != "running"]) == 1
        return (False, 1e9, left) if second else (fits, predicted, left)

    monkeypatch.setattr(admission, "admit", second_too_big)
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 3, "compute": 1e6}))
    result = run_search(spec, tmp_path / "out", progress=False)
    rows = _rows(tmp_path / "out")
    assert [r["stopped_at"] for r in rows] == ["", "budget", "", ""]
    assert rows[1]["state"] == "early_stopped" and float(rows[1]["work_s"]) == 0.0 and rows[1]["epochs_run"] == "0"
    assert result.stop_reason == "max_trials"


def test_a_search_stops_when_even_the_cheapest_trial_cannot_fit(base_ckpt, tmp_path, monkeypatch):
    """The first trial runs (no evidence yet); then the model says even the cheapest one costs 1e7 s of the
    1e6 left: the search ends with 'compute' and starts nothing else (no row of a trial not started)."""
    real = admission.fit
    monkeypatch.setattr(admission, "fit", lambda spec, trials: real(spec, trials) and admission.WorkModel(1e7, 1.0, {}))
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": None, "compute": 1e6}))
    result = run_search(spec, tmp_path / "out", progress=False)
    rows = _rows(tmp_path / "out")
    assert result.stop_reason == "compute" and [r["state"] for r in rows] == ["complete"]


def test_the_command_line_sets_the_compute_budget(base_ckpt, tmp_path):
    path = write_spec(tmp_path, base_ckpt)
    assert load_spec(path, {"compute": "20m"}).budget.compute_s == 1200.0
    assert load_spec(path, {"compute": None}).budget.compute_s is None


def test_the_replay_benchmark_predicts_each_trial_from_the_ones_before_it(tmp_path):
    from autoprune.benchmarks.admission_replay import replay

    head = "number,state,method,target,epochs,epochs_run,work_s,param_distill,distill_epochs,duplicate_of,seed,run\n"
    rows = [f"{i},complete,l1,{t},3,3,{40 + 400 * 3 * t},0,,,0,search\n" for i, t in enumerate((0.5, 0.3, 0.2))]
    path = tmp_path / "trials.csv"
    path.write_text(head + "".join(rows))
    # trial 1 from trial 0 alone (proportional: 640 / 1.5 per unit, x 0.9 -> 384 of 400); trial 2 from both (exact)
    assert replay(path) == [pytest.approx(384 / 400), pytest.approx(1.0)]
    (tmp_path / "old.csv").write_text("number,state,method,target,epochs\n0,complete,l1,0.5,3\n")
    assert replay(tmp_path / "old.csv") == []  # no work_s: from before measured compute


def test_parameters_the_work_model_cannot_read_leave_the_trial_to_run_and_fail_as_usual(spec):
    trials = [done(i, "l1", t, 40 + 400 * 3 * t) for i, t in enumerate((0.5, 0.3, 0.2))]
    bad = {"method": "l1", "target": 0.3, "epochs": 3, "lr": 0.01, "l1.no_such_knob": 1}
    assert admission.admit(spec, FakeStore(trials), bad, 1.0) == (True, None, pytest.approx(1.0 - sum(
        t.record["work_s"] for t in trials)))
