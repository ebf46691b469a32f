"""A killed and resumed search continues the same search: on the smoke spec, the trials of an
interrupted-then-resumed run have the same parameters and results as an uninterrupted run."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from autoprune.search import optuna_backend
from autoprune.search.runner import run_search
from autoprune.search.spec import load_spec

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
VOLATILE = {"number", "duration_s", "prune_s", "work_s", "model", "error"}  # numbers shift by the interrupted one; times vary


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _values(out: Path) -> list[dict[str, str]]:
    with (out / "trials.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if not r["error"].startswith("interrupted")]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in kept]


def test_killed_and_resumed_search_makes_the_same_trials(tmp_path, monkeypatch):
    spec = load_spec(SMOKE, {"max_trials": 5, "sampler": "tpe"})
    plain = run_search(spec, tmp_path / "plain", progress=False)
    assert plain.counts.get("complete", 0) >= 4

    real = optuna_backend.run_trial
    calls = {"n": 0}

    def killed_on_the_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while trial 2 runs
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna_backend, "run_trial", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, tmp_path / "killed", progress=False)
    monkeypatch.setattr(optuna_backend, "run_trial", real)
    resumed = run_search(spec, tmp_path / "killed", resume=True, progress=False)

    assert len(resumed.rows) == len(plain.rows) + 1  # the interrupted trial stays, marked as such
    assert _values(tmp_path / "killed") == _values(tmp_path / "plain")
