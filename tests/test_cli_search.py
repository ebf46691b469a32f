"""`autoprune search` from the command line: the time budget starts after the base model, a search
with no complete trial exits non-zero with the fix, SIGTERM (like Ctrl-C) leaves the report and
prints the exact --resume command, the last lines give the hypervolume, the ETA respects the
time budget, and --threads decides torch's threads."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autoprune.cli import build_parser, main, resolve_threads
from autoprune.errors import AutopruneError
from autoprune.search import live, optuna_backend, runner, stop

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


@pytest.fixture(autouse=True)
def keep_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
def test_base_training_is_not_charged_to_the_time_budget(tmp_path, monkeypatch, capsys):
    real = runner.prepare_base

    def slow_base(*args, **kwargs):
        time.sleep(4.0)  # a base that takes longer than the whole time budget
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "prepare_base", slow_base)
    code = main(["search", SMOKE, "--out", str(tmp_path / "s"), "--time-budget", "3s", "--max-trials", "1",
                 "--no-progress", "--threads", "1"])
    assert code == 0 and "1 trials (1 complete)" in capsys.readouterr().out


def test_last_lines_give_the_hypervolume_and_threads_are_set(tmp_path, capsys):
    code = main(["search", SMOKE, "--out", str(tmp_path / "s"), "--max-trials", "1", "--no-progress",
                 "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "1 trials (1 complete)" in out
    line = next(x for x in out.splitlines() if x.startswith("front hypervolume: "))
    assert 0.0 < float(line.split()[2]) < 1.0 and "reference point (0, 1)" in line
    assert torch.get_num_threads() == 1
    # what optuna-dashboard reads: named objectives, and per-epoch curves in the companion study
    import optuna

    storage = f"sqlite:///{tmp_path / 's' / 'study.db'}"
    assert optuna.load_study(study_name="smoke", storage=storage).metric_names == ["val_acc", "macs"]
    curves = optuna.load_study(study_name="smoke.curves", storage=storage).trials
    assert len(curves) == 1 and curves[0].intermediate_values and curves[0].user_attrs["search_trial"] == 0
    _dashboard_shows(tmp_path / "s" / "study.db")


def _dashboard_shows(db: Path) -> None:
    """optuna-dashboard's JSON API (what its page draws) names the objectives and has the curves."""
    dashboard = pytest.importorskip("optuna_dashboard")  # a viewer, not a dependency: checked where installed
    import json
    import threading
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, dashboard.wsgi(f"sqlite:///{db}"), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/api/studies"
        ids = {s["study_name"]: s["study_id"] for s in json.load(urllib.request.urlopen(base))["study_summaries"]}
        main_study = json.load(urllib.request.urlopen(f"{base}/{ids['smoke']}"))
        curves = json.load(urllib.request.urlopen(f"{base}/{ids['smoke.curves']}"))
    finally:
        server.shutdown()
    assert main_study["objective_names"] == ["val_acc", "macs"]
    assert curves["has_intermediate_values"] and curves["trials"][0]["intermediate_values"]


def test_no_complete_trial_exits_non_zero_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(optuna_backend, "budget_reason", lambda study, limits: "time")  # budget gone at once
    out = tmp_path / "empty"
    code = main(["search", SMOKE, "--out", str(out), "--no-progress", "--time-budget", "1m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: the search ended with no complete trial (time budget spent)")
    cmd = err[0].split("continue it: ")[1]
    assert cmd == shlex.join(["autoprune", "search", SMOKE, "--out", str(out), "--no-progress", "--resume",
                              "--time-budget", "10m"])
    assert build_parser().parse_args(shlex.split(cmd)[1:]).resume is True


def test_sigterm_writes_the_report_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "term"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "search", SMOKE, "--out", str(out), "--max-trials",
                             "200", "--no-progress", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "trials.csv").is_file():  # written after the first finished trial
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert (out / "report.md").is_file() and (out / "pareto.png").is_file()
    line = next(x for x in err.splitlines() if x.strip().startswith("autoprune search"))
    assert shlex.split(line) == ["autoprune", "search", SMOKE, "--out", str(out), "--max-trials", "200",
                                 "--no-progress", "--threads", "1", "--resume"]
    assert "Traceback" not in err


def test_a_sigterm_whose_interrupt_was_swallowed_still_stops_the_search(tmp_path, monkeypatch, capsys):
    """A SIGTERM handler's KeyboardInterrupt raised inside a finaliser is printed and dropped by Python;
    the stop request it also records ends the search at the next check, as an interrupt (exit 130)."""
    real = optuna_backend.run_trial

    def run_then_swallowed_sigterm(*a, **kw):
        result = real(*a, **kw)
        stop.request_stop()  # what the handler records before its (here lost) KeyboardInterrupt
        return result

    monkeypatch.setattr(optuna_backend, "run_trial", run_then_swallowed_sigterm)
    out = tmp_path / "swallowed"
    try:
        code = main(["search", SMOKE, "--out", str(out), "--no-progress", "--max-trials", "4"])
    finally:
        stop.clear_stop()
    err = capsys.readouterr().err
    assert code == 130 and "--resume" in err
    states = [line.split(",") for line in (out / "trials.csv").read_text().splitlines()]
    assert len(states) == 2  # the header and the one trial that finished before the stop


def test_eta_is_the_sooner_of_pace_and_deadline():
    spec = SimpleNamespace(objectives=["val_acc", "macs"], budget=SimpleNamespace(max_trials=30), study="s")
    bar = live.SearchView(spec, mode=None, deadline=None, already_done=10)
    bar.started = 1000.0
    assert bar.eta(10, now=1010.0) is None  # no trial of this run finished yet: no pace
    assert bar.eta(12, now=1010.0) == pytest.approx(18 * 5.0)  # 2 trials in 10 s, 18 to go
    bar.deadline = 1040.0
    assert bar.eta(12, now=1010.0) == pytest.approx(30.0)  # the time budget ends first


def test_threads_option():
    assert resolve_threads("3") == 3
    assert 1 <= resolve_threads("auto", workers=1) <= (os.cpu_count() or 1)
    assert resolve_threads("auto", workers=64) == 1
    with pytest.raises(AutopruneError, match="--threads"):
        resolve_threads("0")


def test_spec_sets_augmentation_and_the_search_records_it(tmp_path):
    import yaml

    from autoprune.search.spec import load_spec

    raw = yaml.safe_load(Path(SMOKE).read_text())
    for value, expected in (("auto", ("crop",)), ("crop,flip", ("crop", "flip")), (None, ())):
        spec_file = tmp_path / "s.yaml"
        spec_file.write_text(yaml.safe_dump({**raw, **({} if value is None else {"augment": value})}))
        spec = load_spec(spec_file)
        assert spec.augment == expected  # digits: auto crops and never flips
        assert load_spec(spec_file).to_dict()["augment"] == list(expected)
    spec_file.write_text(yaml.safe_dump({**raw, "augment": "mirror"}))
    with pytest.raises(AutopruneError, match="augment.*unknown augmentation 'mirror'"):
        load_spec(spec_file)


def test_the_parent_of_a_parallel_search_polls_the_stop_request():
    """A SIGTERM whose KeyboardInterrupt the parent lost (raised inside a storage finaliser) still ends its
    watch over the workers, so they are stopped instead of spending the budget."""
    from autoprune.search import optuna_backend, stop

    class Alive:
        def is_alive(self) -> bool:
            return True

    stop.request_stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            optuna_backend._watch([Alive()], store=None, on_update=None)
    finally:
        stop.clear_stop()


@pytest.mark.slow
def test_sigterm_stops_the_workers_of_a_parallel_search_too(tmp_path):
    import optuna

    out = tmp_path / "par"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "search", SMOKE, "--out", str(out), "--max-trials",
                             "200", "--workers", "2", "--no-progress", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "trials.csv").is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)  # the workers stop with it instead of spending the budget
    assert proc.returncode == 130, err
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out / 'study.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(study.trials) < 50 and "--resume" in err


def test_a_stop_request_mid_epoch_ends_the_trial_at_the_next_training_step(tmp_path, monkeypatch, capsys):
    """The training loops poll the stop request after every step (``trial.poll_stop``), so a SIGTERM
    during a long epoch does not wait for the epoch's end; nothing unfinished is recorded as finished."""
    from autoprune.search import trial as trial_mod

    polls = []
    real = trial_mod.poll_stop

    def poll_then_request():
        polls.append(1)
        if len(polls) == 3:
            stop.request_stop()
        return real()

    monkeypatch.setattr(trial_mod, "poll_stop", poll_then_request)
    out = tmp_path / "mid"
    try:
        code = main(["search", SMOKE, "--out", str(out), "--no-progress", "--max-trials", "2"])
    finally:
        stop.clear_stop()
    assert code == 130 and "--resume" in capsys.readouterr().err
    assert len(polls) == 3  # stopped at the third step, not at an epoch's end
    rows = (out / "trials.csv").read_text().splitlines()[1:] if (out / "trials.csv").is_file() else []
    assert all(",complete," not in r for r in rows)  # the stopped trial is recorded interrupted, never complete
