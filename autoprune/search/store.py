"""The trial store: what a search backend must provide, and the search logic written once above it.

A backend keeps its trials somewhere (the Optuna backend in the study's SQLite file, the Ray backend
in JSON files of the results folder). A :class:`TrialStore` shows them in one shape,
:class:`StoredTrial`, and takes five calls: :meth:`~TrialStore.claim` a trial number for a sampled
configuration, :meth:`~TrialStore.record` its result, :meth:`~TrialStore.trials` lists every started
trial, :meth:`~TrialStore.recover` marks trials left running by a dead process interrupted, and
:meth:`~TrialStore.importance_trials` gives Optuna FrozenTrials for parameter importance. Study-level
facts (objectives, the base model's fingerprint) are :meth:`~TrialStore.meta` / :meth:`~TrialStore.set_meta`.

Everything a search decides from its trials is computed here, for both backends: the budget
(:func:`budget_reason`), the early-stopping reference (:func:`finished_curves`), the ``trials.csv``
rows (:func:`rows`, :func:`write_rows`) and parameter importance (:func:`importance`); the
sampler of each trial is seeded from (spec seed, slot) by
:func:`autoprune.search.samplers.trial_seed`. ``tests/test_store.py`` runs one contract over
both implementations (Optuna's style: one test over every plugin).

Trial states: complete | early_stopped | failed | running. An *interrupted* trial (its process stopped
before it finished) is failed with ``interrupted=True``: it does not count against ``max_trials``
and its configuration runs again under a new number.
"""
from __future__ import annotations

import abc
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .early_stop import Reference
from .results import INTERRUPTED, TRIALS_CSV, TrialResult, make_row, not_started, write_trials_csv

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """A search's budget for this run (None: unlimited)."""

    max_trials: int | None = None  # started trials of the study, interrupted ones not counted
    deadline: float | None = None  # time.time() after which no trial starts
    device_seconds: float | None = None  # sum of trial wall times (time x devices in use)
    work_seconds: float | None = None  # sum of the trials' measured work (record work_s)


@dataclass(frozen=True)
class StoredTrial:
    """One started trial as a store shows it."""

    number: int
    state: str  # complete | early_stopped | failed | running
    hparams: Mapping[str, Any] = field(default_factory=dict)  # space.suggest's flat configuration
    record: Mapping[str, Any] = field(default_factory=dict)  # TrialResult.record() ({} until recorded)
    curve: tuple[float | None, ...] = ()  # val acc per trial epoch
    cost: float | None = None  # the second objective's value
    seconds: float = 0.0  # wall time so far (each trial holds one device: device time)
    interrupted: bool = False
    error: str = ""
    retry_of: int | None = None  # the interrupted trial whose configuration this one runs again


class TrialStore(abc.ABC):
    """Where a backend keeps its trials; see the module docstring for the contract."""

    @abc.abstractmethod
    def claim(self, hparams: Mapping[str, Any], trial: optuna.trial.BaseTrial | None = None,
              **info: Any) -> int:
        """Record that a trial with ``hparams`` starts now; its number (0, 1, 2, ... in claim order).

        ``trial`` is the Optuna trial the configuration was sampled on (its params and distributions
        feed :meth:`importance_trials`); ``info`` holds backend details (e.g. a Ray trial id)."""

    @abc.abstractmethod
    def record(self, number: int, result: TrialResult) -> None:
        """Store the outcome of claimed trial ``number`` (complete, early-stopped or failed)."""

    @abc.abstractmethod
    def trials(self) -> list[StoredTrial]:
        """Every started trial, by number (queued retries are not trials yet)."""

    @abc.abstractmethod
    def recover(self) -> list[int]:
        """At the start of a run: mark trials left running by a dead process interrupted; their numbers."""

    @abc.abstractmethod
    def importance_trials(self) -> list[FrozenTrial]:
        """Complete trials as Optuna FrozenTrials (values, params, distributions): importance's input."""

    @abc.abstractmethod
    def meta(self) -> dict[str, Any]:
        """Study-level facts recorded with :meth:`set_meta`."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: Any) -> None:
        """Record a JSON-serialisable study-level fact (kept across resumes)."""


# ----------------------------------------------------------------------------- written once


def rows(store: TrialStore) -> list[dict[str, Any]]:
    """``trials.csv`` rows of every started trial."""
    out = []
    for t in store.trials():
        error = t.error or (INTERRUPTED if t.interrupted else "")
        state = "interrupted" if t.interrupted else t.state  # one name on the console, in trials.csv, report, plots
        out.append(make_row(t.number, state, t.hparams, t.record, error))
    return out


def write_rows(store: TrialStore, out_dir: str | Path) -> list[dict[str, Any]]:
    """Rewrite ``<out_dir>/trials.csv`` (atomically) from the store; returns the rows."""
    current = rows(store)
    write_trials_csv(Path(out_dir) / TRIALS_CSV, current)
    return current


def finished_curves(store: TrialStore, before: int | None = None) -> Reference:
    """The early-stopping and screening reference: the complete trials as :class:`~.early_stop.Peer`
    (cost, per-epoch val acc, the phase of each epoch, fidelity), and every trial that measured a
    fidelity (complete, early-stopped or screened out) as a screening :class:`~.early_stop.Candidate`.
    ``before``: only the trials numbered below it."""
    from .early_stop import Candidate, Peer, screening_phase

    peers, candidates = [], []
    for t in store.trials():
        if before is not None and t.number >= before:
            continue
        rec = t.record
        if rec.get("duplicate_of") is not None:  # a copy of an earlier trial's result: counted once
            continue
        phases = tuple(rec.get("phases") or ())
        fidelity = rec.get("fidelity")
        if t.state == "complete" and t.cost is not None:
            peers.append(Peer(float(t.cost), tuple(t.curve), phases, None if fidelity is None else float(fidelity)))
        frac = rec.get(_FRACTION.get(store_objective(t), "macs_frac")) or rec.get("macs_frac")
        if t.state in ("complete", "early_stopped") and fidelity is not None and frac is not None:
            candidates.append(Candidate(float(frac), float(fidelity), screening_phase(phases)))
    candidates.extend(round_candidates(store))
    return Reference(tuple(peers), tuple(candidates))


def round_candidates(store: TrialStore) -> list[Any]:
    """The screening round's fidelities (study meta ``round``) as screening candidates."""
    from .early_stop import ONESHOT, Candidate, round_key

    out = []
    for p in store.meta().get("round") or ():
        if p.get("fidelity") is not None and p.get("cost_frac") is not None:
            out.append(Candidate(float(p["cost_frac"]), float(p["fidelity"]), ONESHOT,
                                 round_key(p["method"], p["target"], p["allocation"])))
    return out


def config_key(hparams: Mapping[str, Any]) -> str:
    """A configuration's identity (method, target, allocation, shape, knobs, epochs, lr, ...): the flat
    parameters with floats rounded to 10 significant digits, as sorted JSON."""
    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            return v
        if isinstance(v, float):
            return v if not math.isfinite(v) else float(f"{v:.10g}")
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return str(v)

    return json.dumps({str(k): norm(v) for k, v in hparams.items()}, sort_keys=True)


def same_config(store: TrialStore, hparams: Mapping[str, Any], before: int | None = None) -> StoredTrial | None:
    """The first recorded trial (complete, early-stopped, or failed but not interrupted; numbered below
    ``before`` when given) that ran exactly ``hparams`` and is not itself a reuse or a trial the compute
    budget could not pay for (proposed again, it runs); None if there is none.
    Under one search's seed such a trial would only repeat the measurement at another training seed."""
    key = config_key(hparams)
    for t in store.trials():
        if before is not None and t.number >= before:
            continue
        if t.state not in ("complete", "early_stopped", "failed") or t.interrupted or not t.record:
            continue
        if counts_as_run(t) and config_key(t.hparams) == key:  # not a reuse, and it ran
            return t
    return None


_FRACTION = {"macs": "macs_frac", "params": "params_frac", "latency": "latency_frac"}  # screening windows


def store_objective(t: StoredTrial) -> str:
    """The second objective a trial was recorded with ("macs" unless its record says otherwise)."""
    return str(t.record.get("objective") or "macs")


def budget_reason(store: TrialStore, limits: Limits, now: float | None = None) -> str | None:
    """Why no new trial may start now ('time', 'max_trials', 'device_hours', 'compute'), or None.

    A trial that reused an earlier one's result (``duplicate_of``), or that the compute budget could not pay
    for (``stopped_at = "budget"``), ran nothing: it counts against no budget. Measured work
    (``compute``) includes the screening round's (study meta ``round_work_s``)."""
    now = time.time() if now is None else now
    if limits.deadline is not None and now >= limits.deadline:
        return "time"
    trials = store.trials()
    if limits.max_trials is not None and sum(counts_as_run(t) for t in trials) >= limits.max_trials:
        return "max_trials"
    if limits.device_seconds is not None and sum(t.seconds for t in trials) >= limits.device_seconds:
        return "device_hours"
    if limits.work_seconds is not None and work_used(store, trials) >= limits.work_seconds:
        return "compute"
    return None


def counts_as_run(t: StoredTrial) -> bool:
    """Whether ``t`` counts against ``max_trials``: not interrupted, not a reused result, and started (a
    trial the compute budget could not pay for, ``stopped_at = "budget"``, ran nothing)."""
    return not t.interrupted and t.record.get("duplicate_of") is None and not not_started(t.record)


def work_used(store: TrialStore, trials: Sequence[StoredTrial] | None = None) -> float:
    """Measured seconds of work so far: every recorded trial's ``work_s`` plus the screening round's."""
    trials = store.trials() if trials is None else trials
    return float(sum(float(t.record.get("work_s") or 0.0) for t in trials)) + \
        float(store.meta().get("round_work_s") or 0.0)


def importance(store: TrialStore, objectives: Sequence[str]) -> dict[str, dict[str, float]]:
    """Parameter importance per objective (objective -> parameter -> normalised fANOVA share: main-effect
    variance over the sum of the main effects) over
    the complete trials; {} below :data:`autoprune.report.importance.MIN_TRIALS` of them. See
    :func:`autoprune.report.importance.param_importance`."""
    from ..report.importance import param_importance

    return param_importance(store.importance_trials(), objectives, ["maximize", "minimize"])
