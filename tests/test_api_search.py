"""`autoprune.search(...)` from Python: a spec path, dict or SearchSpec; a sampler name or object; the
result's DataFrames, pick, plot and study; a second call resumes the same study."""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

import autoprune
from autoprune.errors import AutopruneError

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def _spec(base_ckpt: Path, **changes) -> dict:
    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(base=str(base_ckpt), budget={"max_trials": 2}, **changes)
    raw["space"] = {**raw["space"], "method": ["l1", "lrf"]}
    return raw


def test_search_from_python_returns_dataframes_and_resumes_the_same_study(base_ckpt, tmp_path, capsys):
    out = tmp_path / "x"
    r = autoprune.search(_spec(base_ckpt), out=out, sampler=optuna.samplers.RandomSampler(seed=0),
                         progress=False)
    assert isinstance(r, autoprune.SearchResult) and r.folder == out and r.stop_reason == "max_trials"
    assert isinstance(r.trials, pd.DataFrame) and list(r.trials["number"]) == [0, 1]
    assert isinstance(r.front, pd.DataFrame) and len(r.front) >= 1
    assert r.front["macs"].is_monotonic_increasing and set(r.front["state"]) == {"complete"}
    best = r.pick("best")
    assert best["val_acc"] == r.trials["val_acc"].max()
    assert r.plot(tmp_path / "p.png") is not None and (tmp_path / "p.png").stat().st_size > 0
    first = r.study.trials
    assert [t.number for t in first] == [0, 1] and r.study.study_name == "smoke"
    # a second call on the folder continues the same study (the notebook re-run), with a sampler name
    again = autoprune.search(_spec(base_ckpt), out=out, sampler="random", max_trials=3, progress=False)
    study = again.study
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert [t.values for t in study.trials[:2]] == [t.values for t in first]
    # the CLI's refusal without --resume counts the search's own trials, not its .curves companion study
    with pytest.raises(AutopruneError, match=r"already holds a search \(3 trials\)"):
        autoprune.search(_spec(base_ckpt), out=out, resume=False, progress=False)
    assert repr(autoprune.load_search(out)).startswith(f"SearchResult({str(out)!r}: 3 trials")
    assert capsys.readouterr().err == ""  # progress=False: nothing on the console


def test_search_api_refuses_a_bad_spec_or_sampler_before_any_compute(tmp_path):
    with pytest.raises(AutopruneError, match="not an Optuna sampler"):
        autoprune.search({"model": "small_cnn", "data": "digits", "budget": {"max_trials": 1}}, out=tmp_path / "a",
                         sampler=object(), progress=False)
    with pytest.raises(AutopruneError, match="unknown sampler"):
        autoprune.search({"model": "small_cnn", "data": "digits"}, out=tmp_path / "b", sampler="annealing")
    with pytest.raises(AutopruneError, match="must be a file path, a dict or a SearchSpec"):
        autoprune.search(42)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
