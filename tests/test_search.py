"""The search: trial runner, results folder, failures, early stopping, kill + resume, workers, CLI.

Every search here is small_cnn on digits from a base checkpoint trained once for the module,
1-2 epochs per trial and 2-5 trials.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from autoprune.engine.cost import count_macs
from autoprune.engine.plan import load_pruned
from autoprune.errors import AutopruneError
from autoprune.report.pareto import pareto_mask
from autoprune.search import early_stop
from autoprune.search import trial as trial_mod
from autoprune.search.results import INTERRUPTED
from autoprune.search.runner import run_search
from autoprune.search.spec import load_spec

CONTRACT_HEAD = ["number", "state", "method", "target", "allocation", "epochs", "lr"]
CONTRACT_TAIL = ["val_acc", "macs", "macs_frac", "params", "params_frac", "latency_ms", "epochs_run",
                 "duration_s", "feasible", "error", "model", "fidelity", "prune_s", "stopped_at", "latency_frac",
                 "predicted_latency_frac", "work_s", "duplicate_of", "distill_epochs"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_spec(folder: Path, base: Path, name: str = "spec.yaml", **changes) -> Path:
    spec = {
        "study": "t", "model": "small_cnn", "data": "digits", "base": str(base), "device": "cpu", "seed": 0,
        "budget": {"max_trials": 3}, "early_stop": {"enabled": False},
        "space": {"method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": ["uniform", "global"],
                  "epochs": 1, "lr": 0.01},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def load_study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def finished(base_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    spec_path = write_spec(folder, base_ckpt, budget={"max_trials": 4}, constraints={"max_macs_frac": 0.55})
    out = folder / "out"
    result = run_search(load_spec(spec_path), out, progress=False)
    return spec_path, out, result


# ----------------------------------------------------------------------------- results folder


def test_search_writes_the_results_folder(finished):
    _, out, result = finished
    for name in ("spec.yaml", "base.pt", "study.db", "trials.csv", "pareto.csv", "pareto.png", "pareto.html",
                 "report.md"):
        assert (out / name).is_file(), name
    header, rows = read_rows(out / "trials.csv")
    assert header[:7] == CONTRACT_HEAD and header[-len(CONTRACT_TAIL):] == CONTRACT_TAIL
    assert all(h.startswith("param_") for h in header[7:-len(CONTRACT_TAIL)])
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert result.stop_reason == "max_trials" and result.counts == {"complete": 4}
    base = torch.load(out / "base.pt", weights_only=True)["metrics"]
    for r in rows:
        n = int(r["number"])
        assert r["state"] == "complete" and r["error"] == "" and r["method"] == "l1"
        assert int(r["epochs_run"]) == 1 and float(r["duration_s"]) > 0
        assert float(r["macs_frac"]) == pytest.approx(int(r["macs"]) / base["macs"])
        assert float(r["params_frac"]) == pytest.approx(int(r["params"]) / base["params"])
        assert float(r["macs_frac"]) <= float(r["target"]) + 1e-9
        assert r["feasible"] == str(float(r["macs_frac"]) <= 0.55)  # the max_macs_frac constraint
        assert r["model"] == f"models/trial_{n:04d}.pt"
        model, ckpt = load_pruned(out / r["model"])
        assert count_macs(model, (1, 8, 8)) == int(r["macs"])
        assert ckpt["metrics"]["val_acc"] == pytest.approx(float(r["val_acc"]))
        assert ckpt["metrics"]["base_macs"] == base["macs"] and ckpt["extra"]["trial"] == n
        plan = json.loads((out / f"plans/trial_{n:04d}.json").read_text())
        assert plan == ckpt["plan"]
    # the front: exactly the non-dominated feasible trials
    _, front = read_rows(out / "pareto.csv")
    feasible = [r for r in rows if r["feasible"] == "True"]
    pts = np.array([[float(r["val_acc"]), float(r["macs"])] for r in feasible])
    expected = {int(r["number"]) for r, on in zip(feasible, pareto_mask(pts, [True, False])) if on}
    assert {int(r["number"]) for r in front} == expected and expected
    assert [int(r["number"]) for r in result.front] == [int(r["number"]) for r in front]
    # Optuna holds the same numbers, and the constraint as Optuna constraints
    study = load_study(out)
    for t, r in zip(study.trials, rows):
        assert t.values == pytest.approx([float(r["val_acc"]), float(r["macs"])])
        assert t.user_attrs["constraints"] == pytest.approx([float(r["macs_frac"]) - 0.55])
        assert t.system_attrs["constraints:max_macs_frac"] == pytest.approx(float(r["macs_frac"]) - 0.55)
    assert yaml.safe_load((out / "spec.yaml").read_text())["study"] == "t"


def test_existing_folder_needs_resume(finished):
    spec_path, out, _ = finished
    with pytest.raises(AutopruneError, match="--resume"):
        run_search(load_spec(spec_path), out, progress=False)


def test_resume_with_another_space_is_refused(finished, base_ckpt, tmp_path):
    _, out, _ = finished
    other = write_spec(tmp_path, base_ckpt, budget={"max_trials": 4}, constraints={"max_macs_frac": 0.55},
                       space={"target": 0.5})
    with pytest.raises(AutopruneError, match="space"):
        run_search(load_spec(other), out, resume=True, progress=False)


def test_resume_of_a_finished_search_runs_nothing(finished):
    spec_path, out, _ = finished
    before = read_rows(out / "trials.csv")[1]
    again = run_search(load_spec(spec_path), out, resume=True, progress=False)
    assert again.stop_reason == "max_trials"
    assert read_rows(out / "trials.csv")[1] == before


def test_cli_pareto_rebuilds_and_compares(finished, tmp_path, capsys):
    from autoprune.cli import main

    _, out, _ = finished
    (out / "pareto.png").unlink()
    assert main(["pareto", str(out)]) == 0
    assert (out / "pareto.png").is_file()
    text = capsys.readouterr().out
    assert "Pareto front" in text and "pareto.csv" in text
    assert main(["pareto", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    for name in ("pareto.csv", "pareto.png", "pareto.html"):
        assert (tmp_path / "cmp" / name).is_file()


# ----------------------------------------------------------------------------- failures


def test_a_failing_trial_is_recorded_and_the_search_goes_on(base_ckpt, tmp_path, monkeypatch):
    real = trial_mod.engine.prune
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_mod.engine, "prune", flaky)
    spec = load_spec(write_spec(tmp_path, base_ckpt))
    result = run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "failed", "complete"]
    assert rows[1]["error"] == "RuntimeError: injected failure second line"
    assert rows[1]["model"] == "" and rows[1]["feasible"] == "False"
    assert not (tmp_path / "out" / "models" / "trial_0001.pt").exists()
    assert result.counts == {"complete": 2, "failed": 1}
    assert load_study(tmp_path / "out").trials[1].state == optuna.trial.TrialState.FAIL
    _, front = read_rows(tmp_path / "out" / "pareto.csv")
    assert "1" not in {r["number"] for r in front}


def test_nan_loss_marks_trials_failed(base_ckpt, tmp_path):
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 2},
                                space={"lr": 1e30, "target": 0.5}))
    result = run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    assert [r["state"] for r in rows] == ["failed", "failed"]
    assert all(r["error"].startswith("NonFiniteLoss: loss became nan") for r in rows)
    assert all(r["macs"] != "" for r in rows)  # measured before fine-tuning failed
    assert result.front == () and (tmp_path / "out" / "report.md").is_file()


# ----------------------------------------------------------------------------- early stopping


@pytest.mark.parametrize("enabled", [True, False])
def test_early_stopped_trials_never_enter_the_front(base_ckpt, tmp_path, monkeypatch, enabled):
    real = early_stop.should_stop
    seen = []

    def eager(cost, epoch, acc, finished, **kw):  # the real rule with a margin that always stops
        seen.append((cost, epoch, len(list(finished))))
        return real(cost, epoch, acc, finished, **{**kw, "margin": -1.0})

    monkeypatch.setattr(early_stop, "should_stop", eager)
    # same architecture every trial (fixed target and allocation), so every finished trial is a peer
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 4},
                                early_stop={"enabled": enabled, "min_trials": 1},
                                space={"target": 0.5, "allocation": "uniform", "epochs": 2,
                                       "lr": {"low": 0.005, "high": 0.02}}))
    result = run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    _, front = read_rows(tmp_path / "out" / "pareto.csv")
    states = [r["state"] for r in rows]
    if not enabled:
        assert states == ["complete"] * 4 and not seen
        return
    assert states == ["complete", "early_stopped", "early_stopped", "early_stopped"]
    assert [int(r["epochs_run"]) for r in rows] == [2, 1, 1, 1] and result.epochs_run == 5
    assert [r["number"] for r in front] == ["0"]
    assert all(r["model"] == "" for r in rows[1:])
    assert not (tmp_path / "out" / "models" / "trial_0001.pt").exists()
    study = load_study(tmp_path / "out")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    assert [len(t.user_attrs["curve"]) for t in study.trials] == [2, 1, 1, 1]
    assert study.trials[1].user_attrs["state"] == "early_stopped"
    # the rule only ever saw the completed trial (never early-stopped ones)
    assert [(epoch, n) for _, epoch, n in seen] == [(1, 0), (2, 0), (1, 1), (1, 1), (1, 1)]


def test_resrep_trial_is_judged_only_at_its_end(base_ckpt, tmp_path, monkeypatch):
    """Issue 25: ResRep's compactor-epoch readings are not the model it returns, so its training epochs
    are never a stopping point (early_stop.JUDGED_AT_END), even against a rule that always stops."""
    real = early_stop.should_stop
    monkeypatch.setattr(early_stop, "should_stop",
                        lambda *a, **kw: real(*a, **{**kw, "margin": -1.0}))  # always behind a peer
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 2},
                                early_stop={"enabled": True, "min_trials": 1},
                                space={"method": "resrep", "target": 0.5, "allocation": "global", "epochs": 3,
                                       "lr": {"low": 0.005, "high": 0.02}}))
    run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert [int(r["epochs_run"]) for r in rows] == [3, 3]
    # the masked model is still measured every compactor epoch (the curve), just never judged there
    curves = [t.user_attrs["curve"] for t in load_study(tmp_path / "out").trials]
    assert all(len(c) == 3 and all(a is not None for a in c) for c in curves)


def test_a_configuration_that_ran_is_not_run_again(base_ckpt, tmp_path, monkeypatch):
    """Issue 25: TPE ran (l1, uniform, 0.2) three times in 17 trials. A repeat reuses the earlier
    result: nothing runs, work_s 0, duplicate_of names the trial, the sampler is told the same values,
    it is never on the front twice and it counts against no max_trials budget."""
    calls = []
    real = trial_mod._run
    monkeypatch.setattr(trial_mod, "_run", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 3},
                                space={"target": [0.5, 0.7], "allocation": "uniform", "epochs": 1}))
    result = run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    reused = [r for r in rows if r["duplicate_of"]]
    ran = [r for r in rows if not r["duplicate_of"]]
    assert len(ran) == 2 and len(calls) == 2  # only two configurations exist: the space is exhausted
    assert result.stop_reason == "exhausted" and len(reused) == 25
    for r in reused:
        first = next(x for x in ran if x["number"] == r["duplicate_of"])
        assert r["target"] == first["target"] and r["val_acc"] == first["val_acc"]
        assert float(r["work_s"]) == 0 and r["feasible"] == "False" and r["model"] == ""
    assert all(float(r["work_s"]) > 0 for r in ran)
    values = {tuple(t.values) for t in load_study(tmp_path / "out").trials if t.values}
    assert len(values) == 2  # the sampler saw the same two outcomes again
    _, front = read_rows(tmp_path / "out" / "pareto.csv")
    assert {r["number"] for r in front} <= {r["number"] for r in ran}


def test_compute_budget_counts_measured_seconds(base_ckpt, tmp_path):
    """budget.compute: measured seconds of trial work (CPU time here); every trial records work_s."""
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": None, "compute": 1e-6}))
    assert spec.budget.compute_s == 1e-6 and spec.budget.max_trials is None
    result = run_search(spec, tmp_path / "out", progress=False)
    assert result.stop_reason == "compute" and len(result.rows) == 1
    assert float(result.rows[0]["work_s"]) > 0
    assert "Measured work in all" in (tmp_path / "out" / "report.md").read_text()


def test_screening_fine_tunes_only_the_best_candidates_of_a_macs_bucket(base_ckpt, tmp_path, monkeypatch):
    """Same MACs every trial (one bucket); from the second trial on, only a candidate whose fidelity beats
    every earlier one (keep 0.01) is fine-tuned; the others stop right after pruning, run no epoch,
    are never feasible and never on the front. The fidelity of every trial is in trials.csv."""
    fidelities = iter([0.9, 0.5, 0.95, 0.1])
    real = trial_mod.evaluate

    def scripted(model, split, device):  # trial.evaluate is only the fidelity (fit evaluates on its own)
        return {**real(model, split, device), "acc": next(fidelities)}

    monkeypatch.setattr(trial_mod, "evaluate", scripted)
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 4},
                                screen={"keep": 0.01, "bucket": 0.5, "min_peers": 1},
                                space={"target": 0.5, "allocation": "uniform", "epochs": 2,
                                       "lr": {"low": 0.005, "high": 0.02}}))
    assert spec.screen.enabled and spec.screen.keep == 0.01
    run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    assert [r["stopped_at"] for r in rows] == ["", "screen", "", "screen"]
    assert [r["state"] for r in rows] == ["complete", "early_stopped", "complete", "early_stopped"]
    assert [float(r["fidelity"]) for r in rows] == [0.9, 0.5, 0.95, 0.1]
    assert [int(r["epochs_run"]) for r in rows] == [2, 0, 2, 0]
    assert [r["feasible"] for r in rows] == ["True", "False", "True", "False"]
    assert all(float(r["prune_s"]) > 0 for r in rows)
    _, front = read_rows(tmp_path / "out" / "pareto.csv")
    assert {r["number"] for r in front} <= {"0", "2"}


# ----------------------------------------------------------------------------- kill + resume


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoprune", *args]


@pytest.mark.slow
def test_sigkill_then_resume_keeps_finished_trials(base_ckpt, tmp_path):
    spec_path = write_spec(tmp_path, base_ckpt, budget={"max_trials": 5}, space={"epochs": 2})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli("search", str(spec_path), "--out", str(out), "--no-progress"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    done: list[dict[str, str]] = []
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "trials.csv").exists():
                done = [r for r in read_rows(out / "trials.csv")[1] if r["state"] == "complete"]
                # kill while the third trial trains, so one trial is left RUNNING
                if len(done) >= 2 and load_study(out).get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    _, killed_rows = read_rows(out / "trials.csv")
    done = [r for r in killed_rows if r["state"] == "complete"]
    assert len(done) >= 2
    mtimes = {r["number"]: os.stat(out / r["model"]).st_mtime_ns for r in done}
    running = [t for t in load_study(out).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1

    res = subprocess.run(_cli("search", str(spec_path), "--out", str(out), "--resume", "--no-progress"), env=env,
                         check=False, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Pareto front" in res.stdout
    _, rows = read_rows(out / "trials.csv")
    by_number = {r["number"]: r for r in rows}
    for r in done:  # kept with the same numbers and values, not re-run
        assert by_number[r["number"]] == r
        assert os.stat(out / r["model"]).st_mtime_ns == mtimes[r["number"]]
    counted = [r for r in rows if r["error"] != INTERRUPTED]
    assert len(counted) == 5 and all(r["state"] == "complete" for r in counted)
    study = load_study(out)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in running:  # the interrupted trial is failed+interrupted, and its configuration ran again
        assert by_number[str(t.number)]["error"] == INTERRUPTED and by_number[str(t.number)]["state"] == "interrupted"
        retries = [u for u in study.trials if u.user_attrs.get("retry_of") == t.number]
        assert len(retries) == 1 and retries[0].params == t.params
        assert retries[0].state == optuna.trial.TrialState.COMPLETE


# ----------------------------------------------------------------------------- workers


@pytest.mark.slow
def test_two_workers_share_one_study(base_ckpt, tmp_path):
    # trials long enough that the second worker process has started before the first has run all four
    # (with 1-epoch trials a slow spawn on a loaded 2-core machine left worker 0 nothing to do)
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 4}, workers=2, space={"epochs": 10}))
    result = run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["state"] == "complete" for r in rows)
    assert result.stop_reason == "max_trials"
    workers = {t.user_attrs["worker"] for t in load_study(tmp_path / "out").trials}
    assert workers == {0, 1}


@pytest.mark.slow
def test_workers_that_stop_on_their_own_rule_say_which(base_ckpt, tmp_path):
    """Two configurations and max_trials 5: each worker ends on the repeats rule (`exhausted`), which no
    budget the parent can recompute explains; the search reports it rather than "workers stopped". (A
    configuration still running on the other worker is not yet a repeat, so each may run twice: at most 4.)"""
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 5}, workers=2,
                                space={"target": [0.5, 0.7], "allocation": "uniform", "epochs": 1}))
    result = run_search(spec, tmp_path / "out", progress=False)
    _, rows = read_rows(tmp_path / "out" / "trials.csv")
    assert 2 <= len([r for r in rows if not r["duplicate_of"]]) <= 4
    assert result.stop_reason == "exhausted"
