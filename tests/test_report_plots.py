"""Plots of a study speak for themselves: method colours never look like "dominated", early-stopped
trials are hollow and say so, legends are not clipped, accuracy stops at 100 %, and one MAC unit
(chosen from the base) is used by the PNG and report.md."""
from __future__ import annotations

import matplotlib.colors
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import yaml

from autoprune.report import plots as report_plots
from autoprune.report.plots import METHOD_COLOURS, cost_unit, plot_pareto
from autoprune.report.tables import write_report

COLUMNS = ["number", "state", "method", "target", "allocation", "val_acc", "macs", "macs_frac", "params",
           "params_frac", "feasible", "epochs_run"]
ROWS = [(0, "complete", "l1", 0.5, "global", 1.0, 600_000, 0.5, 30_000, 0.5, True, 3),
        (1, "complete", "lrf", 0.3, "global", 0.99, 360_000, 0.3, 20_000, 0.33, True, 3),
        (2, "complete", "fsm", 0.3, "global", 0.95, 370_000, 0.31, 20_000, 0.33, True, 3),
        (3, "early_stopped", "resrep", 0.2, "global", 0.60, 240_000, 0.2, 15_000, 0.25, False, 1)]
BASE = {"val_acc": 0.995, "macs": 1_200_000, "params": 60_000}


@pytest.fixture(autouse=True)
def small_html(monkeypatch):
    monkeypatch.setattr(report_plots, "PLOTLY_JS", "cdn")


def _study(path, name="demo"):
    path.mkdir(parents=True)
    pd.DataFrame(ROWS, columns=COLUMNS).to_csv(path / "trials.csv", index=False)
    (path / "spec.yaml").write_text(yaml.safe_dump({"study": name, "objectives": ["val_acc", "macs"]}))
    return path


def test_cost_unit_comes_from_the_base():
    assert cost_unit(1_191_000) == ("M", 1e6) and cost_unit(4.1e9) == ("G", 1e9)
    assert cost_unit(62_970) == ("K", 1e3) and cost_unit(500) == ("", 1.0) and cost_unit(None) == ("", 1.0)


def test_method_colours_are_not_the_dominated_grey():
    for name, colour in METHOD_COLOURS.items():
        r, g, b = matplotlib.colors.to_rgb(colour)
        assert max(r, g, b) - min(r, g, b) > 0.2, f"{name} is drawn grey, like faded black 'dominated' points"
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)


def test_png_units_accuracy_cap_and_legends(tmp_path):
    df = pd.DataFrame(ROWS, columns=COLUMNS).assign(study="demo")
    fig = plot_pareto({"demo": df}, str(tmp_path / "p.png"), None, {"demo": BASE})
    ax = fig.axes[0]
    assert ax.get_xlabel() == "MACs (M)"  # the base's 1.2 M, although every trial is under 1 M
    assert ax.get_ylim()[1] <= 100.0  # a trial at 100 % does not push the axis above it
    texts = [t.get_text() for legend in (*ax.artists, ax.get_legend()) for t in legend.get_texts()]
    assert any(t.startswith("early-stopped (hollow") for t in texts)
    assert {"l1", "lrf", "fsm", "resrep"} <= set(texts)


def test_compare_plot_keeps_both_legends_inside_the_image(tmp_path):
    long = {f"study with a rather long name number {i}": pd.DataFrame(ROWS, columns=COLUMNS) for i in range(2)}
    plot_pareto(long, str(tmp_path / "cmp.png"), None, {k: BASE for k in long})
    img = matplotlib.image.imread(tmp_path / "cmp.png")[..., :3]
    assert np.all(img[:, -3:] > 0.95), "something (a legend) is cut at the right edge"
    assert np.all(img[-3:] > 0.95) and np.all(img[:3] > 0.95)


def test_report_md_uses_the_same_unit(tmp_path):
    study = _study(tmp_path / "demo")
    write_report(study, BASE)
    md = (study / "report.md").read_text()
    assert "1.2 M MACs" in md and "60 K params" in md and "| MACs (M) |" in md
    assert "| 0.36 |" in md  # trial 1's 360 000 MACs in M
