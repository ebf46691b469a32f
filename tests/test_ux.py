"""Defects a user met (issue 28): warnings a notebook sees, one name for an interrupted trial, --pick
with explicit units."""
from __future__ import annotations

import warnings

import pandas as pd
import pytest

import autoprune
from autoprune.errors import AutopruneError, AutopruneWarning
from autoprune.models import ModelSpec, create_model


def test_prune_without_data_warns_through_warnings_and_lrf_names_its_weight_fit_fallback():
    spec = ModelSpec("small_cnn", 10, 1, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autoprune.prune(create_model(spec), "lrf", 0.5, spec=spec)
    messages = [str(w.message) for w in caught if issubclass(w.category, AutopruneWarning)]
    assert any("weight fit" in m and "pass data=" in m for m in messages), messages
    assert any("BN statistics are not recalibrated" in m for m in messages), messages
    with warnings.catch_warnings(record=True) as caught:  # asked for explicitly: no fall-back to warn about
        warnings.simplefilter("always")
        autoprune.prune(create_model(spec), "lrf", 0.5, spec=spec, fit="weights")
    assert not any("weight fit" in str(w.message) for w in caught)


def _table(tmp_path):
    rows = [
        {"number": 0, "state": "complete", "method": "l1", "val_acc": 0.95, "macs": 500_000, "macs_frac": 0.5,
         "params": 50, "params_frac": 0.5, "feasible": True, "error": "", "latency_ms": 1.5},
        {"number": 1, "state": "failed", "method": "lrf", "val_acc": None, "macs": None, "macs_frac": None,
         "params": None, "params_frac": None, "feasible": False, "error": "RuntimeError: boom", "latency_ms": None},
        {"number": 2, "state": "interrupted", "method": "fsm", "val_acc": None, "macs": None, "macs_frac": None,
         "params": None, "params_frac": None, "feasible": False,
         "error": "interrupted: the process running this trial stopped before it finished", "latency_ms": None},
        # written before "interrupted" was its own state: failed + the interrupted error
        {"number": 3, "state": "failed", "method": "l1", "val_acc": None, "macs": None, "macs_frac": None,
         "params": None, "params_frac": None, "feasible": False,
         "error": "interrupted: the process running this trial stopped before it finished", "latency_ms": None},
        {"number": 4, "state": "complete", "method": "l1", "val_acc": 0.97, "macs": 800_000, "macs_frac": 0.8,
         "params": 80, "params_frac": 0.8, "feasible": True, "error": "", "latency_ms": 2.5},
    ]
    (tmp_path / "trials.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    return tmp_path


def test_an_interrupted_trial_is_called_interrupted_in_the_report_and_the_plot(tmp_path):
    from autoprune.report import tables
    from autoprune.report.plots import plot_pareto

    folder = _table(tmp_path)
    tables.write_report(folder)
    md = (folder / "report.md").read_text()
    assert "failed 1" in md and "interrupted 2" in md
    failed_section = md.split("## Failed trials", 1)[1].split("##", 1)[0]
    assert "trial 1" in failed_section and "trial 2" not in failed_section and "trial 3" not in failed_section
    assert "## Interrupted trials" in md and "2, 3" in md.split("## Interrupted trials", 1)[1]
    fig = plot_pareto(tables.load_trials([folder]), str(tmp_path / "p.png"))
    ax = fig.axes[0]
    assert "2 interrupted (run again; not drawn)" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any(label.startswith("failed") for label in labels)  # no marker to show: no legend entry


def test_pick_with_explicit_units(tmp_path):
    from autoprune.report.choose import choose_trial

    folder = _table(tmp_path)
    (folder / "models").mkdir()
    for n in (0, 4):
        (folder / "models" / f"trial_{n:04d}.pt").write_bytes(b"")
    assert choose_trial(folder, "macs_frac<=0.5").trial == 0
    assert choose_trial(folder, "macs<=0.6M").trial == 0 and choose_trial(folder, "macs<=1M").trial == 4
    assert choose_trial(folder, "params<=60").trial == 0
    assert choose_trial(folder, "latency_ms<=2").trial == 0
    with pytest.raises(AutopruneError, match=r"macs_frac<=0\.5 for 0\.5 of the base model's MACs, or macs<=0\.5M"):
        choose_trial(folder, "macs<=0.5")
