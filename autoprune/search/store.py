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
rows (:func:`rows`, :func:`write_rows`), parameter importance (:func:`importance`) and the sampler
seed of a resumed search (:func:`sampler_seed`). ``tests/test_store.py`` runs one contract over
both implementations (Optuna's style: one test over every plugin).

Trial states: complete | early_stopped | failed | running. An *interrupted* trial (its process stopped
before it finished) is failed with ``interrupted=True``: it does not count against ``max_trials``
and its configuration runs again under a new number.
"""
from __future__ import annotations

import abc
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import INTERRUPTED, TrialResult, make_row, one_line, write_trials_csv

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from .spec import SearchSpec

log = logging.getLogger(__name__)

SEED_STRIDE = 1009  # a resumed search's sampler seed moves by this per trial already started
MIN_IMPORTANCE_TRIALS = 2  # complete trials needed before parameter importance is computed


@dataclass(frozen=True)
class Limits:
    """A search's budget for this run (None: unlimited)."""

    max_trials: int | None = None  # started trials of the study, interrupted ones not counted
    deadline: float | None = None  # time.time() after which no trial starts
    device_seconds: float | None = None  # sum of trial wall times (time x devices in use)


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
        out.append(make_row(t.number, t.state, t.hparams, t.record, error))
    return out


def write_rows(store: TrialStore, out_dir: str | Path) -> list[dict[str, Any]]:
    """Rewrite ``<out_dir>/trials.csv`` (atomically) from the store; returns the rows."""
    current = rows(store)
    write_trials_csv(Path(out_dir) / "trials.csv", current)
    return current


def finished_curves(store: TrialStore) -> list[tuple[float, list[float | None]]]:
    """(cost, per-epoch val acc) of the complete trials: the early-stopping rule's reference."""
    return [(float(t.cost), list(t.curve)) for t in store.trials()
            if t.state == "complete" and t.cost is not None]


def budget_reason(store: TrialStore, limits: Limits, now: float | None = None) -> str | None:
    """Why no new trial may start now ('time', 'max_trials', 'device_hours'), or None."""
    now = time.time() if now is None else now
    if limits.deadline is not None and now >= limits.deadline:
        return "time"
    trials = store.trials()
    if limits.max_trials is not None and sum(not t.interrupted for t in trials) >= limits.max_trials:
        return "max_trials"
    if limits.device_seconds is not None and sum(t.seconds for t in trials) >= limits.device_seconds:
        return "device_hours"
    return None


def sampler_seed(spec: SearchSpec, store: TrialStore, worker: int = 0) -> int | None:
    """The sampler seed of worker ``worker``: a resumed search draws new numbers, not the first run's."""
    if spec.seed is None:
        return None
    return int(spec.seed) + worker + len(store.trials()) * SEED_STRIDE


def importance(store: TrialStore, objectives: Sequence[str]) -> dict[str, dict[str, float]]:
    """Optuna parameter importance per objective (objective -> parameter -> share of variance);
    {} when fewer than MIN_IMPORTANCE_TRIALS trials are complete. Each objective is evaluated on its
    own values, so the direction does not matter to the number (Optuna's fANOVA evaluator)."""
    import optuna

    complete = store.importance_trials()
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        log.info("parameter importance needs at least %d complete trials (have %d)", MIN_IMPORTANCE_TRIALS,
                 len(complete))
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials(complete)
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
        except Exception as exc:  # noqa: BLE001 - conditional/constant params make evaluators fail
            log.warning("parameter importance for %s unavailable: %s", name, one_line(exc))
            continue
        out[name] = {k: float(v) for k, v in imp.items()}
    return out
