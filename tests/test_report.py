"""Tests for autoprune.report.tables: files written from a hand-made trials.csv."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import yaml

from autoprune.errors import AutopruneError
from autoprune.report import plots as report_plots
from autoprune.report.tables import load_trials, plot_pareto, read_base, write_report

COLUMNS = ["number", "state", "method", "target", "allocation", "epochs", "lr", "param_penalty", "param_compensate",
           "param_mult_0", "val_acc", "macs", "macs_frac", "params", "params_frac", "latency_ms", "epochs_run",
           "duration_s", "feasible", "error", "model"]
ROWS = [
    (0, "complete", "resrep", 0.5, "global", 3, 0.01, 1e-4, None, None, 0.95, 500_000, 0.5, 40_000, 0.5, None, 3, 10.0,
     True, None, "models/trial_0000.pt"),
    (1, "complete", "lrf", 0.3, "searched", 3, 0.01, None, True, 0.8, 0.90, 300_000, 0.3, 30_000, 0.375, None, 3, 9.0,
     True, None, "models/trial_0001.pt"),
    (2, "complete", "l1", 0.3, "uniform", 3, 0.02, None, None, None, 0.85, 300_000, 0.3, 20_000, 0.25, None, 3, 8.0,
     True, None, "models/trial_0002.pt"),
    (3, "early_stopped", "fsm", 0.2, "global", 3, 0.01, None, None, None, 0.97, 200_000, 0.2, 20_000, 0.25, None, 1,
     3.0, False, None, None),  # would dominate almost everything if it counted
    (4, "failed", "lrf", 0.4, "global", 3, 0.01, None, False, None, None, 400_000, 0.4, None, None, None, 0, 1.0, False,
     "loss is NaN at epoch 1", None),
    (5, "complete", "l1", 0.1, "global", 3, 0.01, None, None, None, 0.70, 100_000, 0.1, 10_000, 0.125, None, 3, 8.0,
     False, None, "models/trial_0005.pt"),  # infeasible (below min_val_acc)
    (6, "complete", "fsm", 0.8, "uniform", 3, 0.01, None, None, None, 0.96, 800_000, 0.8, 70_000, 0.875, None, 3, 8.0,
     True, None, "models/trial_0006.pt"),
    (7, "complete", "resrep", 0.8, "uniform", 3, 0.01, 1e-3, None, None, 0.94, 800_000, 0.8, 70_000, 0.875, None, 3,
     8.0, True, None, "models/trial_0007.pt"),
    (8, "running", "resrep", 0.5, "global", 3, 0.01, 1e-3, None, None, None, None, None, None, None, None, None, None,
     None, None, None),
]
FRONT = [1, 0, 6]  # by MACs; 3 (early-stopped), 4 (failed), 5 (infeasible) never, 2 and 7 are dominated
IMPORTANCE = {"val_acc": {"method": 0.6, "target": 0.3, "lr": 0.1}, "macs": {"target": 0.9, "method": 0.1}}


@pytest.fixture(autouse=True)
def small_html(monkeypatch):
    monkeypatch.setattr(report_plots, "PLOTLY_JS", "cdn")  # do not copy 4 MB of plotly.js into every test folder


def make_study(path, rows=ROWS, spec: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path / "trials.csv", index=False)
    (path / "spec.yaml").write_text(yaml.safe_dump(spec or {"study": path.name, "model": "small_cnn",
                                                           "data": {"name": "digits"},
                                                           "objectives": ["val_acc", "macs"]}))
    return path


def test_write_report_files_and_front(tmp_path):
    study = make_study(tmp_path / "demo")
    paths = write_report(study, {"val_acc": 0.98}, IMPORTANCE)
    for p in (paths.pareto_csv, paths.pareto_png, paths.pareto_html, paths.report_md, paths.importance_csv):
        assert p is not None and (study / p.split("/")[-1]).is_file()
    front = pd.read_csv(paths.pareto_csv)
    assert front["number"].tolist() == FRONT
    assert list(front.columns) == COLUMNS
    assert set(front["state"]) == {"complete"} and front["feasible"].all()
    # rows are trials.csv's rows verbatim
    raw = (study / "trials.csv").read_text().splitlines()
    assert (study / "pareto.csv").read_text().splitlines()[1:] == [raw[1 + n] for n in FRONT]


def test_png_is_a_real_plot(tmp_path):
    study = make_study(tmp_path / "demo")
    paths = write_report(study)
    img = matplotlib.image.imread(paths.pareto_png)
    assert img.shape[0] > 300 and img.shape[1] > 400
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # axes, text, several method colours, faded points


def test_html_hover_shows_params(tmp_path):
    pytest.importorskip("plotly")
    study = make_study(tmp_path / "demo")
    html = Path(write_report(study).pareto_html).read_text(encoding="utf-8")
    assert "param_penalty: 0.0001" in html and "trial 1" in html and "validation accuracy (%)" in html


def test_html_without_plotly_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    study = make_study(tmp_path / "demo")
    paths = write_report(study)
    text = Path(paths.pareto_html).read_text(encoding="utf-8")
    assert "autoprune[plot]" in text and "pareto.png" in text


def test_report_md_and_importance(tmp_path):
    study = make_study(tmp_path / "demo")
    write_report(study, {"val_acc": 0.98}, IMPORTANCE)
    md = (study / "report.md").read_text()
    assert "# Study demo" in md
    assert "complete 6, early_stopped 1, failed 1, running 1" in md and "infeasible: 1" in md
    assert "Base model: val acc 98.00 %, 1 M MACs" in md  # MACs recovered from macs / macs_frac
    table = [line for line in md.splitlines() if line.startswith("| ") and "models/" in line]
    assert [int(line.split("|")[1]) for line in table] == FRONT
    assert "| method | 0.600 | 0.100 |" in md
    assert "trial 4 (lrf): loss is NaN at epoch 1" in md
    imp = pd.read_csv(study / "importance.csv", index_col="param")
    assert imp.loc["target", "macs_share"] == 0.9 and list(imp.columns) == ["val_acc_share", "macs_share"]
    # rebuilt later without importance (autoprune pareto DIR): importance.csv is read back
    paths = write_report(study)
    assert paths.importance_csv is not None and "| method | 0.600 | 0.100 |" in (study / "report.md").read_text()


def test_params_objective_from_spec(tmp_path):
    study = make_study(tmp_path / "p", spec={"study": "p", "objectives": ["val_acc", "params"]})
    front = pd.read_csv(write_report(study).pareto_csv)
    assert front["number"].tolist() == [2, 1, 0, 6]  # trial 2 has the fewest params among its accuracy


def test_empty_front_still_writes(tmp_path):
    rows = [r for r in ROWS if r[1] != "complete"]
    study = make_study(tmp_path / "empty", rows=rows)
    paths = write_report(study)
    assert pd.read_csv(paths.pareto_csv).empty
    assert "No complete feasible trial" in (study / "report.md").read_text()


def test_load_trials_and_multi_study_plot(tmp_path):
    a = make_study(tmp_path / "a")
    b = make_study(tmp_path / "b", rows=[r[:10] + (r[10] - 0.05 if r[10] else r[10],) + r[11:] for r in ROWS])
    df = load_trials([a, b])
    assert len(df) == 2 * len(ROWS) and sorted(df["study"].unique()) == ["a", "b"]
    assert df["feasible"].dtype == bool and df["val_acc"].dtype == float
    out = tmp_path / "cmp" / "pareto.png"
    plot_pareto({n: g for n, g in df.groupby("study")}, str(out), str(tmp_path / "cmp" / "pareto.html"),
                {"a": {"val_acc": 0.98}, "b": {"val_acc": 0.97}})
    assert out.stat().st_size > 10_000
    assert read_base(a)["macs"] == pytest.approx(1_000_000)
    with pytest.raises(AutopruneError, match="no trials.csv"):
        load_trials(tmp_path / "nowhere")
