"""What a user sees of a long run: phase lines without a terminal (never a flood, never a carriage
return), bars on one, a trial's phase travelling from its worker through a file to the search display,
and the display's counts and front."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from autoprune import progress
from autoprune.progress_view import BarReporter, LineReporter, console, fmt_seconds
from autoprune.search import live, phase_files

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_reporter_prints_each_phase_once_and_progress_at_most_every_interval():
    out, clock = io.StringIO(), Clock()
    reporter = LineReporter(out, interval=30.0, grace=0, clock=clock)
    with progress.use(reporter), progress.phase("fine-tune", total=2, unit="epoch") as run:
        for e in (1, 2):
            with progress.phase(f"epoch {e}/2", total=1000, unit="step") as ep:
                for _ in range(1000):  # 1000 steps over 50 s of the fake clock: one progress line
                    clock.t += 0.05
                    ep.advance()
                ep.postfix = "val_acc 0.9"
            run.advance()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert lines[0].endswith("fine-tune ...")
    epoch_ends = [line for line in lines if "epoch" in line and "done in" in line]
    assert len(epoch_ends) == 2 and all("val_acc 0.9" in line for line in epoch_ends)
    progress_lines = [line for line in lines if "step (" in line]
    assert 2 <= len(progress_lines) <= 4, lines  # ~every 30 s of 100 s, not once per step
    assert "ETA" in progress_lines[0] and lines[-1].split("] ")[1].startswith("fine-tune done in")


def test_bar_reporter_nests_bars_and_closes_them():
    out = io.StringIO()
    rep = BarReporter(out)
    with progress.use(rep), progress.phase("train", total=2, unit="epoch") as run:
        with progress.phase("epoch 1/2", total=3, unit="step") as ep:
            for _ in range(3):
                ep.advance()
        run.advance()
    assert not rep._bars and "train" in out.getvalue() and "epoch 1/2" in out.getvalue()


def test_cli_console_prints_autoprune_warnings_as_one_line(capsys):
    import warnings

    from autoprune.errors import warn

    with console(LineReporter()), warnings.catch_warnings():
        warnings.simplefilter("always")
        warn("prune() got no data: BN statistics are not recalibrated")
    assert capsys.readouterr().err.strip() == "warning: prune() got no data: BN statistics are not recalibrated"


def test_fmt_seconds():
    assert fmt_seconds(4.25) == "4.2 s" and fmt_seconds(75) == "1:15" and fmt_seconds(3725) == "1:02:05"
    assert fmt_seconds(None) == "?" and fmt_seconds(float("nan")) == "?"


def test_a_trials_phase_reaches_the_search_display_through_its_file(tmp_path):
    with phase_files.trial_progress(tmp_path, 7, {"method": "lrf", "target": 0.45, "allocation": "global"}) as rep:
        rep.min_interval = 0.1
        with progress.phase("fine-tune", total=20, unit="epoch") as run:
            run.advance(2)
            with progress.phase("epoch 3/20", total=400, unit="step") as ep:
                ep.advance(120)  # a step only marks the state changed; the flusher writes it
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # within min_interval (more on a loaded machine)
                    running = phase_files.read_running(tmp_path)
                    if running and running[0]["phases"] and running[0]["phases"][-1]["done"] == 120:
                        break
                    time.sleep(0.05)
    assert [d["trial"] for d in running] == [7]
    line = live.trial_line(running[0])
    assert line.startswith("trial 7 (lrf 0.45 global)")
    assert "fine-tune > epoch 3/20 (120/400 step (30 %)" in line and "ETA" in line
    assert phase_files.read_running(tmp_path) == []  # the file goes with the trial
    # a file left by a process that is gone (a killed worker) is not a running trial
    dead = {"trial": 3, "pid": 2 ** 22 + 12345, "host": phase_files._HOST, "phases": []}
    (tmp_path / phase_files.PROGRESS_DIR / "trial_0003.json").write_text(json.dumps(dead))
    assert phase_files.read_running(tmp_path) == []


def _rows(*states):
    return [{"number": i, "state": s, "feasible": s == "complete", "val_acc": 0.9 + i / 100, "macs_frac": 0.3 + i / 10,
             "duration_s": 2.0, "error": "interrupted: ..." if s == "interrupted" else ""} for i, s in enumerate(states)]


def test_search_view_counts_done_and_running_and_shows_the_front(tmp_path):
    spec = type("S", (), {"study": "demo", "objectives": ("val_acc", "macs"),
                          "budget": type("B", (), {"max_trials": 10})()})()
    out = io.StringIO()
    view = live.SearchView(spec, tmp_path, mode="lines", stream=out, interval=30.0)
    view.update(_rows("complete", "early_stopped", "interrupted", "complete"))
    text = view.summary(running=2)
    assert text.startswith("3/10 done (2 complete, 1 early-stopped), 2 running")
    assert "front 2" in text and "93.0 % at 0.60" in text and "90.0 % at 0.30" in text
    doc = {"trial": 4, "label": "l1 0.50 uniform", "pid": os.getpid(), "host": phase_files._HOST, "time": time.time(),
           "started": time.time() - 5, "phases": [{"name": "grouping", "done": 0, "total": None, "elapsed": 1.0}]}
    view._render_lines([doc], final=False)
    view._render_lines([doc], final=False)  # the same phase within the interval: no second line
    lines = out.getvalue().splitlines()
    finished = [line for line in lines if " complete: val_acc" in line or "early-stopped" in line]
    assert len(finished) == 3  # trials 0, 1 and 3 announced once each (the interrupted one is not done)
    assert sum("trial 4 (l1 0.50 uniform)" in line and "grouping" in line for line in lines) == 1


def test_search_shows_each_running_trials_phase_without_a_terminal(base_ckpt, tmp_path, monkeypatch, capsys):
    from autoprune.search.runner import run_search
    from autoprune.search.spec import spec_from_dict

    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(base=str(base_ckpt), budget={"max_trials": 2})
    raw["space"] = {**raw["space"], "method": ["l1"], "epochs": 6}
    monkeypatch.setattr(live, "POLL_S", 0.1)
    run_search(spec_from_dict(raw, "<dict>"), tmp_path / "out", progress="lines")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.count("trial 0 complete") == 1 and err.count("trial 1 complete") == 1
    assert "search smoke [" in err and "2/2 done (2 complete)" in err
    assert any("trial 0 (l1" in line and ("fine-tune" in line or "scoring" in line) for line in err.splitlines())
    assert not (tmp_path / "out" / phase_files.PROGRESS_DIR / "trial_0000.json").exists()


@pytest.mark.slow
def test_two_workers_show_two_running_trials(base_ckpt, tmp_path, monkeypatch, capsys):
    from autoprune.search.runner import run_search
    from autoprune.search.spec import spec_from_dict

    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(base=str(base_ckpt), budget={"max_trials": 2}, workers=2)
    raw["space"] = {**raw["space"], "method": ["l1"], "epochs": 15}
    monkeypatch.setattr(live, "POLL_S", 0.2)
    seen = []
    real = live.read_running
    monkeypatch.setattr(live, "read_running", lambda out: seen.append(len(real(out))) or real(out))
    run_search(spec_from_dict(raw, "<dict>"), tmp_path / "out", progress="lines")
    assert max(seen) == 2  # both workers' trials at once, each from its own process


def test_line_reporter_announces_a_phase_only_once_it_has_run_a_while():
    out = io.StringIO()
    with progress.use(LineReporter(out, grace=0.3)):
        with progress.phase("load data"):
            pass  # quick: nothing printed (a command failing now prints only its error)
        assert out.getvalue() == ""
        with progress.phase("LRF feature fit"):
            time.sleep(0.8)
    lines = out.getvalue().splitlines()
    assert next(line.split("] ", 1)[1] for line in lines) == "LRF feature fit ..."
    assert "LRF feature fit done in" in lines[-1] and len(lines) == 2


def test_search_view_bars_render_a_bar_per_running_trial(tmp_path):
    spec = type("S", (), {"study": "demo", "objectives": ("val_acc", "macs"),
                          "budget": type("B", (), {"max_trials": 4})()})()
    out = io.StringIO()
    view = live.SearchView(spec, None, mode="bars", stream=out)
    view.start()
    view._stop.set()  # render by hand below, not from the poller
    now = time.time()
    for epoch, done in ((3, 120), (4, 10)):
        doc = {"trial": 2, "label": "lrf 0.45 global", "time": now, "started": now - 60,
               "phases": [{"name": "fine-tune", "done": epoch - 1, "total": 20, "unit": "epoch", "elapsed": 50.0},
                          {"name": f"epoch {epoch}/20", "done": done, "total": 400, "unit": "step", "elapsed": 5.0}]}
        view._render_bars([doc])
    assert set(view._trial_bars) == {2} and view._trial_bars[2].total == 400 and view._trial_bars[2].n == 10
    view._render_bars([])  # the trial ended: its bar goes
    assert not view._trial_bars
    view.close()
    assert "trial 2 (lrf 0.45 global, 1:00) fine-tune > epoch 4/20" in out.getvalue()
