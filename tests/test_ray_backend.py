"""The Ray Tune backend: same trials, same results folder, two-objective early stopping, kill + resume.

One local Ray (2 CPUs) serves the whole module; its workers run a setup hook that makes the
early-stopping rule stop every trial that has a finished peer (margin -1, as in test_search.py), which
only matters to the one test that enables early stopping.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
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
from autoprune.search import ray_backend
from autoprune.search.early_stop import Peer
from autoprune.search.ray_backend import RayOptions
from autoprune.search.ray_store import RayStore
from autoprune.search.results import INTERRUPTED, make_row
from autoprune.search.runner import run_search
from autoprune.search.spec import load_spec
from autoprune.search.store import Limits, budget_reason, finished_curves, rows

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_spec(folder: Path, base: Path | None, **changes) -> Path:
    spec = {"study": "r", "model": "small_cnn", "data": "digits", "base": base and str(base), "device": "cpu",
            "seed": 0,
            "sampler": "random", "budget": {"max_trials": 3}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": ["uniform", "global"],
                      "epochs": 1, "lr": 0.01}}
    spec.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- without Ray


def test_without_ray_the_backend_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(AutopruneError) as err:
        ray_backend.require_ray()
    assert str(err.value) == "the ray backend needs the 'ray' extra: pip install 'autoprune[ray]'"
    spec = load_spec(ROOT / "search_spaces" / "smoke.yaml")
    with pytest.raises(AutopruneError, match=r"pip install 'autoprune\[ray\]'"):
        run_search(spec, tmp_path / "out", backend="ray", progress=False)
    assert not (tmp_path / "out" / "spec.yaml").exists()  # refused before any compute


def test_options_and_resources_are_checked():
    with pytest.raises(AutopruneError, match="--cpus-per-trial"):
        RayOptions(cpus_per_trial=0)
    with pytest.raises(AutopruneError, match="--max-concurrent"):
        RayOptions(max_concurrent=0)
    with pytest.raises(AutopruneError, match="Ray Client"):
        RayOptions(address="ray://head:10001")

    class Spec:
        device, workers = "cpu", 1

    cluster = {"CPU": 8.0, "GPU": 2.0}
    assert ray_backend.resources(Spec, RayOptions(), cluster) == (1.0, 0.0, 8)
    assert ray_backend.resources(Spec, RayOptions(cpus_per_trial=3), cluster) == (3.0, 0.0, 2)
    assert ray_backend.resources(Spec, RayOptions(max_concurrent=3), cluster)[2] == 3
    Spec.device = "cuda"
    assert ray_backend.resources(Spec, RayOptions(), cluster) == (1.0, 1.0, 2)
    assert ray_backend.resources(Spec, RayOptions(gpus_per_trial=0.5), cluster) == (1.0, 0.5, 4)
    with pytest.raises(AutopruneError, match="--gpus-per-trial > 0"):
        ray_backend.resources(Spec, RayOptions(gpus_per_trial=0), cluster)
    with pytest.raises(AutopruneError, match="has 0 GPUs"):
        ray_backend.resources(Spec, RayOptions(), {"CPU": 8.0})
    Spec.device = "auto"
    assert ray_backend.resources(Spec, RayOptions(), {"CPU": 4.0})[1] == 0.0


def test_rows_from_claims_and_results(tmp_path):
    """A result gives the state; a claim of the live run is running; any other claim was interrupted."""
    store = RayStore(tmp_path)
    hp = {"method": "l1", "target": 0.5, "allocation": "global", "epochs": 1, "lr": 0.01, "batch_size": 128}
    for n, run in [(0, "run_000"), (1, "run_000"), (2, "run_001")]:
        store.write_claim(n, {"number": n, "trial_id": f"t{n}", "run": run, "hparams": hp,
                              "optuna_params": {"target": 0.5}, "distributions": {}})
    record = {"val_acc": 0.9, "macs": 10, "feasible": True, "epochs_run": 1, "model": "models/trial_0000.pt"}
    store.write_result(0, {"number": 0, "state": "complete", "hparams": hp, "record": record, "values": [0.9, 10.0],
                           "cost": 10.0, "curve": [0.9], "constraints": []})
    live = rows(RayStore(tmp_path, run_id="run_001"))
    assert [r["state"] for r in live] == ["complete", "interrupted", "running"]
    assert live[0] == make_row(0, "complete", hp, record)
    assert live[1]["error"] == INTERRUPTED and live[2]["error"] == ""
    after = rows(RayStore(tmp_path))  # the run is over: nothing is running any more
    assert [r["state"] for r in after] == ["complete", "interrupted", "interrupted"]
    assert store.retries() == [(1, {"target": 0.5}, {"retry_of": 1}), (2, {"target": 0.5}, {"retry_of": 2})]
    store.write_claim(3, {"number": 3, "trial_id": "t3", "run": "run_002", "hparams": hp, "retry_of": 1, "slot": 1})
    assert [n for n, _, _ in store.retries()] == [2, 3]
    assert store.retries()[1][2] == {"retry_of": 3, "slot": 1}  # a retry of a retry keeps the first one's slot
    assert store.next_number() == 4 and finished_curves(store).peers == (Peer(10.0, (0.9,)),)


def test_the_searcher_tells_optuna_values_only_for_complete_trials(tmp_path):
    """Ray's stock OptunaSearch takes an early-stopped trial's partial accuracy as its final value;
    ours tells Optuna PRUNED for it and FAIL for failed trials, and hands out numbered configurations
    only while the budget lasts."""
    pytest.importorskip("ray")
    import optuna
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    spec = load_spec(write_spec(tmp_path, None, constraints={"max_macs_frac": 0.6}, budget={"max_trials": 4}))
    ended = {"t0": ("complete", 0.9), "t1": ("early_stopped", 0.99), "t2": ("failed", float("nan"))}

    def result(state, acc):
        payload = {"constraints": [-0.1]}  # feasible
        return {"state": state, "val_acc": acc, "cost": 5.0, "autoprune_result": json.dumps(payload)}

    stock = OptunaSearch(space=ray_backend._Space(spec), metric=["val_acc", "cost"], mode=["max", "min"])
    for tid, (state, acc) in ended.items():
        stock.suggest(tid)
        stock.on_trial_complete(tid, result(state, acc))
    assert [t.state.name for t in stock._ot_study.trials][:2] == ["COMPLETE", "COMPLETE"]  # the hazard

    key = str(tmp_path)
    run = ray_backend._Run(spec=spec, store=RayStore(tmp_path, "run_000"), limits=Limits(max_trials=4))
    ray_backend._RUNS[key] = run
    try:
        ours = ray_backend.AutopruneSearch(spec, key, optuna.samplers.RandomSampler(seed=0))
        configs = [ours.suggest(f"t{i}") for i in range(4)]
        assert [c["autoprune"]["number"] for c in configs] == [0, 1, 2, 3]
        assert ours.suggest("t4") == Searcher.FINISHED and run.reason == "max_trials"
        for tid, (state, acc) in ended.items():
            ours.on_trial_complete(tid, result(state, acc))
        ours.on_trial_complete("t3", None, error=True)  # the Ray actor died
    finally:
        ray_backend._RUNS.pop(key)
    trials = ours._ot_study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert trials[0].values == [0.9, 5.0] and trials[1].values is None
    assert [t.number for t in ours._ot_study.best_trials] == [0]
    assert trials[1].system_attrs["constraints:max_macs_frac"] == -0.1
    claims = RayStore(tmp_path).claims()
    assert [claims[n]["hparams"] for n in range(4)] == [c["autoprune"]["hparams"] for c in configs]
    assert {c["run"] for c in claims.values()} == {"run_000"}


def test_a_stop_request_stops_the_ray_driver_at_its_next_step():
    """The stop request a SIGTERM records (in case its KeyboardInterrupt is lost) is polled by the Ray
    driver too: Tune calls the callback's on_step_begin at every step of its loop."""
    pytest.importorskip("ray")
    from autoprune.search import stop

    callback = ray_backend.AutopruneCallback("nothing")
    callback.on_step_begin(0, [])  # nothing requested: the loop goes on
    stop.request_stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            callback.on_step_begin(1, [])
    finally:
        stop.clear_stop()


def test_an_optuna_backend_folder_is_refused(tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "study.db").write_text("")
    with pytest.raises(AutopruneError, match="optuna backend"):
        ray_backend.check(tmp_path)


# ----------------------------------------------------------------------------- on a local Ray


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")

    def eager_early_stop() -> None:  # nested, so Ray ships it by value to its worker processes
        from autoprune.search import early_stop

        real = early_stop.should_stop

        def eager(cost, epoch, acc, finished, **kw):
            return real(cost, epoch, acc, finished, **{**kw, "margin": -1.0})

        early_stop.should_stop = eager

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
                 runtime_env={"worker_process_setup_hook": eager_early_stop})
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_smoke_spec_on_ray_matches_the_optuna_backend(ray_address, tmp_path):
    spec = load_spec(ROOT / "search_spaces" / "smoke.yaml")
    ray_out, optuna_out = tmp_path / "ray", tmp_path / "optuna"
    t0 = time.time()
    result = run_search(spec, ray_out, backend="ray", ray_options=RayOptions(max_concurrent=2), progress=False)
    took = time.time() - t0
    optuna_out.mkdir()
    shutil.copy(ray_out / "base.pt", optuna_out / "base.pt")  # the same base model, trained once
    run_search(spec, optuna_out, progress=False)

    assert result.stop_reason == "max_trials" and result.counts == {"complete": 4}
    # two trials at a time: some pair of trials ran at the same moment
    spans = {n: (r["started"], r["finished"]) for n, r in RayStore(ray_out).results().items()}
    assert sorted(spans) == [0, 1, 2, 3]
    overlaps = [(a, b) for a in spans for b in spans if a < b
                and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlaps, (spans, took)
    # the same results folder as the Optuna backend's (plus ray/; study.db is a snapshot for the dashboard)
    for name in ("spec.yaml", "base.pt", "trials.csv", "pareto.csv", "pareto.png", "pareto.html", "report.md",
                 "study.db"):
        assert (ray_out / name).is_file(), name
    snapshot = optuna.load_study(study_name=spec.study, storage=f"sqlite:///{ray_out / 'study.db'}")
    assert snapshot.user_attrs["backend"] == "ray" and len(snapshot.trials) == 4
    header, rows = read_rows(ray_out / "trials.csv")
    optuna_header, optuna_rows = read_rows(optuna_out / "trials.csv")
    assert header == optuna_header
    # the same sampler and seed hand out the same configurations (columns up to val_acc)
    params = header[: header.index("val_acc")]
    assert [[r[c] for c in params] for r in rows] == [[r[c] for c in params] for r in optuna_rows]
    base = torch.load(ray_out / "base.pt", weights_only=True)["metrics"]
    for r in rows:
        n = int(r["number"])
        assert r["model"] == f"models/trial_{n:04d}.pt" and int(r["epochs_run"]) == 1
        model, ckpt = load_pruned(ray_out / r["model"])
        assert count_macs(model, (1, 8, 8)) == int(r["macs"])
        assert float(r["macs_frac"]) == pytest.approx(int(r["macs"]) / base["macs"])
        assert ckpt["metrics"]["val_acc"] == pytest.approx(float(r["val_acc"])) and ckpt["extra"]["trial"] == n
        assert json.loads((ray_out / f"plans/trial_{n:04d}.json").read_text()) == ckpt["plan"]
    _, front = read_rows(ray_out / "pareto.csv")
    pts = np.array([[float(r["val_acc"]), float(r["macs"])] for r in rows])
    assert sorted(int(r["number"]) for r in front) == [i for i, on in enumerate(pareto_mask(pts, [True, False])) if on]
    # the tools that read a results folder work on it unchanged
    from autoprune.cli import main
    from autoprune.report.retrain import choose_trial

    assert main(["pareto", str(ray_out)]) == 0
    assert choose_trial(ray_out, "best").trial in {int(r["number"]) for r in front}


@pytest.mark.slow
def test_an_early_stopped_trials_partial_accuracy_is_not_on_the_front(ray_address, base_ckpt, tmp_path):
    # the same architecture every trial (fixed target and allocation): every finished trial is a peer,
    # and the workers' rule (margin -1) stops every trial that has one at its first epoch
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 3},
                                early_stop={"enabled": True, "min_trials": 1},
                                space={"method": "l1", "target": 0.5, "allocation": "uniform", "epochs": 2,
                                       "lr": [0.01, 0.02, 0.05]}))
    out = tmp_path / "out"
    result = run_search(spec, out, backend="ray", ray_options=RayOptions(max_concurrent=1), progress=False)
    _, rows = read_rows(out / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "early_stopped", "early_stopped"]
    assert [int(r["epochs_run"]) for r in rows] == [2, 1, 1] and result.epochs_run == 4
    stopped = rows[1:]
    assert all(r["val_acc"] != "" and r["model"] == "" and r["feasible"] == "False" for r in stopped)
    assert not (out / "models" / "trial_0001.pt").exists()
    _, front = read_rows(out / "pareto.csv")
    assert [r["number"] for r in front] == ["0"]
    # Ray's Optuna searcher was told PRUNED, never the partial accuracy as a final value
    state_files = sorted((out / "ray" / "tune").glob("run_*/searcher-state-*.pkl"))
    study = pickle.loads(state_files[-1].read_bytes())["_ot_study"]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert study.trials[0].values == [pytest.approx(float(rows[0]["val_acc"])), float(rows[0]["macs"])]
    assert [t.number for t in study.best_trials] == [0]
    # the rule only compared with the complete trial
    peers = finished_curves(RayStore(out)).peers
    assert len(peers) == 1 and len(peers[0].curve) == 2


@pytest.mark.slow
def test_sigkill_of_the_driver_then_resume_loses_no_finished_trial(ray_address, base_ckpt, tmp_path):
    spec_path = write_spec(tmp_path, base_ckpt, budget={"max_trials": 4}, space={
        "method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": ["uniform", "global"], "epochs": 2,
        "lr": 0.01})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autoprune", "search", str(spec_path), "--out", str(out), "--backend", "ray",
           "--address", ray_address, "--max-concurrent", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    done: list[dict[str, str]] = []
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "trials.csv").exists():  # kill once a trial finished and one started after it
                rows = read_rows(out / "trials.csv")[1]
                done = [r for r in rows if r["state"] == "complete"]
                if done and any(r["state"] == "running" and int(r["number"]) >= 2 for r in rows):
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    import ray

    wait = time.time() + 60  # Ray ends the dead driver's trials; wait until their CPUs are free again
    while time.time() < wait and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.2)
    _, killed_rows = read_rows(out / "trials.csv")
    done = [r for r in killed_rows if r["state"] == "complete"]
    assert done
    mtimes = {r["number"]: os.stat(out / r["model"]).st_mtime_ns for r in done}

    result = run_search(load_spec(spec_path), out, resume=True, backend="ray",
                        ray_options=RayOptions(address=ray_address, max_concurrent=2), progress=False)
    _, rows = read_rows(out / "trials.csv")
    by_number = {r["number"]: r for r in rows}
    for r in done:  # kept with the same number and values, not run again
        assert by_number[r["number"]] == r
        assert os.stat(out / r["model"]).st_mtime_ns == mtimes[r["number"]]
    counted = [r for r in rows if r["error"] != INTERRUPTED]
    assert len(counted) == 4 and all(r["state"] == "complete" for r in counted), rows
    assert result.stop_reason == "max_trials"
    # the trials the kill interrupted are recorded as interrupted, and their configurations ran again
    claims = RayStore(out).claims()
    interrupted = [int(r["number"]) for r in rows if r["error"] == INTERRUPTED]
    assert interrupted and all(r["state"] == "interrupted" for r in rows if r["error"] == INTERRUPTED)
    for n in interrupted:
        again = [c for c in claims.values() if c.get("retry_of") == n]
        assert len(again) == 1 and again[0]["hparams"] == claims[n]["hparams"]
        assert by_number[str(again[0]["number"])]["state"] == "complete"
    assert len(list((out / "ray" / "tune").glob("run_*"))) == 2


@pytest.mark.slow
def test_killed_and_resumed_ray_search_makes_the_same_trials(ray_address, base_ckpt, tmp_path, monkeypatch):
    """As tests/test_resume.py for the Optuna backend: one trial at a time, a search stopped while its
    trial 2 was handed out and resumed gives the same trials.csv values as an uninterrupted one; the
    retry keeps the slot, so the training seed, of the trial it replaces (a new number would reseed it)."""
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 4}, space={
        "method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": ["uniform", "global"], "epochs": 1,
        "lr": 0.05}))
    options = RayOptions(address=ray_address, max_concurrent=1)
    run_search(spec, tmp_path / "plain", backend="ray", ray_options=options, progress=False)

    real = ray_backend._Run.claim

    def killed_on_the_third(self, *args, **kwargs):
        number = real(self, *args, **kwargs)
        if number == 2:  # the driver stops once trial 2 is claimed: it never finishes
            raise KeyboardInterrupt
        return number

    monkeypatch.setattr(ray_backend._Run, "claim", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, tmp_path / "killed", backend="ray", ray_options=options, progress=False)
    monkeypatch.setattr(ray_backend._Run, "claim", real)
    resumed = run_search(spec, tmp_path / "killed", resume=True, backend="ray", ray_options=options, progress=False)

    _, plain = read_rows(tmp_path / "plain" / "trials.csv")
    _, rows = read_rows(tmp_path / "killed" / "trials.csv")
    assert resumed.stop_reason == "max_trials" and len(rows) == len(plain) + 1
    assert [r["number"] for r in rows if r["error"] == INTERRUPTED] == ["2"]
    volatile = {"number", "duration_s", "prune_s", "work_s", "model", "error"}
    kept = [{k: v for k, v in r.items() if k not in volatile} for r in rows if r["error"] != INTERRUPTED]
    assert kept == [{k: v for k, v in r.items() if k not in volatile} for r in plain]
    claims = RayStore(tmp_path / "killed").claims()
    assert claims[3]["retry_of"] == 2 and claims[3]["slot"] == claims[2]["slot"] == 2 and claims[4]["slot"] == 3


def test_budget_counts_claims_of_this_run_but_not_interrupted_ones(tmp_path):
    store = RayStore(tmp_path, run_id="run_001")
    for n, run in [(0, "run_000"), (1, "run_001"), (2, "run_001")]:
        store.write_claim(n, {"number": n, "trial_id": f"t{n}", "run": run, "hparams": {}, "suggested": time.time()})
    store.write_result(2, {"number": 2, "state": "failed", "record": {"duration_s": 5.0}})

    def reason(**limits):
        return budget_reason(store, Limits(**limits))

    assert reason(max_trials=3) is None  # trial 0 was interrupted: it does not count
    assert reason(max_trials=2) == "max_trials"
    assert reason(device_seconds=4.0) == "device_hours" and reason(device_seconds=60.0) is None
    assert reason(deadline=time.time() - 1) == "time"


def test_an_address_nobody_answers_fails_in_seconds_with_one_line(tmp_path, capsys):
    """Ray itself retries a dead address for minutes, printing dozens of warnings: refused at once, before
    any compute."""
    pytest.importorskip("ray")
    from autoprune.cli import main

    out = tmp_path / "out"
    start = time.monotonic()
    code = main(["search", str(ROOT / "search_spaces" / "smoke.yaml"), "--backend", "ray", "--address",
                 "127.0.0.1:1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 15
    assert err.count("\n") == 1 and "127.0.0.1:1" in err and "ray start --head" in err
    assert not (out / "spec.yaml").exists()
    assert main(["search", str(ROOT / "search_spaces" / "smoke.yaml"), "--backend", "ray", "--address",
                 "nohost", "--out", str(out)]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
