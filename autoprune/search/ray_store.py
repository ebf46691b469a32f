"""The Ray backend's state in the results folder (no Ray types): one JSON file per trial.

``<out>/ray/trials/trial_NNNN.json`` is the driver's claim of a configuration; ``results/trial_NNNN.json``
is what the trial recorded when it ended. ``trials.csv``, early stopping's comparison curves, resume
and parameter importance are all rebuilt from these files (see :mod:`autoprune.search.ray_backend`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import trial as trial_mod
from .trial import INTERRUPTED, make_row

log = logging.getLogger(__name__)

RAY_DIR = "ray"



class Store:
    """Claims and results in ``<out>/ray``: one JSON file per trial, written atomically."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / RAY_DIR
        self.claims_dir = self.root / "trials"
        self.results_dir = self.root / "results"
        self._curves: dict[int, tuple[float, list]] = {}
        self._seen: set[int] = set()

    def claims(self) -> dict[int, dict]:
        return _read_dir(self.claims_dir)

    def results(self) -> dict[int, dict]:
        return _read_dir(self.results_dir)

    def result(self, number: int) -> dict | None:
        return _read_json(self.results_dir / _name(number))

    def write_claim(self, number: int, data: Mapping[str, Any]) -> None:
        _write_json(self.claims_dir / _name(number), data)

    def write_result(self, number: int, data: Mapping[str, Any]) -> None:
        _write_json(self.results_dir / _name(number), data)

    def next_number(self) -> int:
        return max([*self.claims(), *self.results()], default=-1) + 1

    def finished_curves(self) -> list[tuple[float, list]]:
        """(cost, curve) of the complete trials so far: the early-stopping rule's reference."""
        if self.results_dir.is_dir():
            for path in self.results_dir.glob("trial_*.json"):
                number = int(path.stem.split("_")[1])
                if number in self._seen:
                    continue
                data = _read_json(path)
                if data is None:
                    continue
                self._seen.add(number)
                if data.get("state") == "complete" and data.get("cost") is not None:
                    self._curves[number] = (float(data["cost"]), list(data.get("curve") or []))
        return list(self._curves.values())


def _name(number: int) -> str:
    return f"trial_{number:04d}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_dir(folder: Path) -> dict[int, dict]:
    out = {}
    if folder.is_dir():
        for path in folder.glob("trial_*.json"):
            data = _read_json(path)
            if data is not None:
                out[int(path.stem.split("_")[1])] = data
    return out


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def trial_rows(out_dir: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """``trials.csv`` rows: a result gives its state; a claim of the live run ``run_id`` without one is
    running; any other claim without a result was interrupted (failed, not counted, run again)."""
    store = Store(out_dir)
    claims, results = store.claims(), store.results()
    rows = []
    for number in sorted(set(claims) | set(results)):
        res, claim = results.get(number), claims.get(number, {})
        hparams = (res or claim).get("hparams") or {}
        if res is not None:
            record = res.get("record") or {}
            rows.append(make_row(number, res["state"], hparams, record, record.get("error") or ""))
        elif run_id is not None and claim.get("run") == run_id:
            rows.append(make_row(number, "running", hparams))
        else:
            rows.append(make_row(number, "failed", hparams, error=INTERRUPTED))
    return rows


def history(spec: Any, out_dir: str | Path) -> list[Any]:
    """Finished trials as Optuna FrozenTrials (Optuna's names and distributions), oldest first."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState

    store = Store(out_dir)
    claims, results = store.claims(), store.results()
    names = trial_mod.constraint_names(spec)
    states = {"complete": TrialState.COMPLETE, "early_stopped": TrialState.PRUNED, "failed": TrialState.FAIL}
    out = []
    for number in sorted(results):
        res, claim = results[number], claims.get(number)
        if claim is None or "distributions" not in claim:
            continue
        state = states.get(res.get("state"), TrialState.FAIL)
        if state == TrialState.COMPLETE and not res.get("values"):
            continue
        constraints = None
        if state != TrialState.FAIL and res.get("constraints"):
            constraints = dict(zip(names, map(float, res["constraints"])))
        out.append(optuna.trial.create_trial(
            state=state, values=res.get("values") if state == TrialState.COMPLETE else None,
            params=claim.get("optuna_params") or {}, constraints=constraints,
            distributions={k: json_to_distribution(v) for k, v in claim["distributions"].items()},
            user_attrs={"number": number, "state": res.get("state")}))
    return out


def importance(spec: Any, out_dir: str | Path) -> dict[str, dict[str, float]]:
    """Parameter importance per objective, from the folder's trials (the Optuna backend's evaluator)."""
    import optuna

    from . import optuna_backend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=optuna_backend.directions(spec))
    study.add_trials(history(spec, out_dir))
    return optuna_backend.importance(study, spec.objectives)
