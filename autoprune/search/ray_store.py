"""The Ray backend's trial store: one JSON file per trial in the results folder (no Ray types).

``<out>/ray/trials/trial_NNNN.json`` is the driver's claim of a configuration (number, parameters,
Optuna parameters and distributions, run id, when it was handed out); ``results/trial_NNNN.json`` is
what the trial recorded when it ended; ``study.json`` holds study-level facts. A claim without a
result is *running* while its run (``run_id``) is the live one and *interrupted* otherwise. Budget,
early stopping, rows and importance are computed from :meth:`RayStore.trials` in
:mod:`autoprune.search.store`, as for the Optuna backend.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import write_json
from .results import TrialResult
from .store import StoredTrial, TrialStore

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

RAY_DIR = "ray"
META = "study.json"


class RayStore(TrialStore):
    """Claims and results in ``<out>/ray``, written atomically; ``run_id`` names the live run (if any)."""

    def __init__(self, out_dir: str | Path, run_id: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.root = self.out_dir / RAY_DIR
        self.claims_dir = self.root / "trials"
        self.results_dir = self.root / "results"

    # -- files
    def claims(self) -> dict[int, dict]:
        return _read_dir(self.claims_dir)

    def results(self) -> dict[int, dict]:
        return _read_dir(self.results_dir)

    def result(self, number: int) -> dict | None:
        return _read_json(self.results_dir / _name(number))

    def write_claim(self, number: int, data: Mapping[str, Any]) -> None:
        write_json(self.claims_dir / _name(number), data)

    def write_result(self, number: int, data: Mapping[str, Any]) -> None:
        write_json(self.results_dir / _name(number), data)

    def next_number(self) -> int:
        return max([*self.claims(), *self.results()], default=-1) + 1

    # -- the TrialStore contract
    def claim(self, hparams: Mapping[str, Any], trial: optuna.trial.BaseTrial | None = None,
              **info: Any) -> int:
        from optuna.distributions import distribution_to_json

        number = self.next_number()
        data: dict[str, Any] = {"number": number, "run": self.run_id, "hparams": dict(hparams),
                                "suggested": time.time(), **info}
        if trial is not None:
            data.update(optuna_params=dict(trial.params), retry_of=trial.user_attrs.get("retry_of"),
                        distributions={k: distribution_to_json(d) for k, d in trial.distributions.items()})
        self.write_claim(number, data)
        return number

    def record(self, number: int, result: TrialResult) -> None:
        self.write_result(number, make_payload(result, "", math.nan, time.time()))

    def trials(self) -> list[StoredTrial]:
        claims, results = self.claims(), self.results()
        now = time.time()
        out = []
        for number in sorted(set(claims) | set(results)):
            res, claim = results.get(number), claims.get(number, {})
            hparams = (res or claim).get("hparams") or {}
            retry_of = claim.get("retry_of")
            if res is not None:
                record = res.get("record") or {}
                cost = res.get("cost")
                out.append(StoredTrial(number, str(res.get("state") or "failed"), hparams, record,
                                       tuple(res.get("curve") or ()), None if cost is None else float(cost),
                                       float(record.get("duration_s") or 0.0), error=record.get("error") or "",
                                       retry_of=retry_of))
            elif self.run_id is not None and claim.get("run") == self.run_id:
                out.append(StoredTrial(number, "running", hparams, seconds=now - float(claim.get("suggested", now)),
                                       retry_of=retry_of))
            else:
                out.append(StoredTrial(number, "failed", hparams, interrupted=True, retry_of=retry_of))
        return out

    def recover(self) -> list[int]:
        """Claims without a result from other runs are interrupted already (nothing to write)."""
        return [t.number for t in self.trials() if t.interrupted]

    def importance_trials(self) -> list[FrozenTrial]:
        return [t for t in history(self) if t.state.name == "COMPLETE"]

    def meta(self) -> dict[str, Any]:
        return _read_json(self.root / META) or {}

    def set_meta(self, key: str, value: Any) -> None:
        write_json(self.root / META, {**self.meta(), key: value})

    def retries(self) -> list[tuple[int, dict, dict]]:
        """(number, Optuna params, user attrs) of interrupted trials whose configuration has not run again;
        the user attrs name the trial replaced (``retry_of``) and its ``slot``, which the retry keeps."""
        claims = self.claims()
        retried = {c.get("retry_of") for c in claims.values()}
        out = []
        for t in self.trials():
            if t.interrupted and t.number not in retried:
                claim = claims.get(t.number, {})
                attrs = {"retry_of": t.number, **({"slot": claim["slot"]} if claim.get("slot") is not None else {})}
                out.append((t.number, claim.get("optuna_params") or {}, attrs))
        return out


def make_payload(result: TrialResult, trial_id: str, started: float, finished: float) -> dict[str, Any]:
    """What a Ray trial writes (and reports) when it ends."""
    return {"number": result.number, "trial_id": trial_id, "state": result.state,
            "hparams": dict(result.hparams), "record": result.record(), "curve": list(result.curve),
            "cost": result.cost, "constraints": list(result.constraints),
            "values": list(result.values) if result.values is not None else None,
            "started": started, "finished": finished, "node": socket.gethostname()}


def history(store: RayStore, constraint_names: tuple[str, ...] = ()) -> list[FrozenTrial]:
    """Finished trials as Optuna FrozenTrials (Optuna's names and distributions), oldest first: the
    warm start of a resumed run's searcher and the input of parameter importance."""
    import optuna
    from optuna.distributions import json_to_distribution

    from .study import outcome

    claims, results = store.claims(), store.results()
    out = []
    for number in sorted(results):
        res, claim = results[number], claims.get(number)
        if claim is None or "distributions" not in claim:
            continue
        done = outcome(str(res.get("state")), res.get("values"), res.get("constraints") or (), constraint_names)
        out.append(optuna.trial.create_trial(
            state=done.state, values=done.values, params=claim.get("optuna_params") or {},
            constraints=done.constraints or None,
            distributions={k: json_to_distribution(v) for k, v in claim["distributions"].items()},
            user_attrs={"number": number, "state": res.get("state")}))
    return out


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
