"""The Optuna study of a search, shared by both backends: its storage, samplers and outcome mapping.

The Optuna backend keeps its trials in the study ``<study>`` in ``<out>/study.db`` (:data:`STORAGE`);
the Ray backend keeps them in files and writes the same study as a snapshot for optuna-dashboard
(:mod:`autoprune.search.ray_study_db`), and its searcher runs an in-memory study. One mapping from a
trial's outcome to Optuna serves all three (:func:`outcome`):

- complete: state COMPLETE with values ``[val_acc, cost]``; constraints (Optuna 5's
  ``set_constraint``; every sampler then sees feasibility);
- early-stopped: PRUNED with its constraints. Multi-objective studies reject Optuna's pruners, but a
  PRUNED trial is still the honest state: it has no values, never enters ``study.best_trials``, and
  TPE counts it among the bad trials (never the partial accuracy as if the trial had finished);
- failed (and a "complete" trial without values): FAIL, no values, no constraints.

Per-epoch validation accuracy: Optuna's ``trial.report`` (and the dashboard's learning curves)
exists only for single-objective studies, so every trial is also added to a companion study
``<study>.curves`` (one objective, val_acc) with the curve as its intermediate values and the search
trial's number, method, target and cost as user attrs (:func:`add_curves`).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AutopruneError
from .results import TrialResult, one_line
from .samplers import make_sampler, trial_seed

if TYPE_CHECKING:
    import optuna
    from optuna.trial import TrialState

    from .spec import SearchSpec

log = logging.getLogger(__name__)

STORAGE = "study.db"  # the study's SQLite file in the results folder
CURVES_SUFFIX = ".curves"
DIRECTIONS = ("maximize", "minimize")  # objectives are (val_acc, macs | params | latency)


def storage(out_dir: str | Path, name: str = STORAGE, timeout_s: float = 300) -> optuna.storages.RDBStorage:
    """The SQLite storage ``<out_dir>/<name>``; SQLite serialises writers, and a generous busy timeout
    lets N worker processes share the file."""
    import optuna

    url = f"sqlite:///{(Path(out_dir) / name).resolve()}"
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": timeout_s}})


def directions(spec: SearchSpec) -> list[str]:
    return list(DIRECTIONS)


def spec_sampler(spec: SearchSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    """``spec``'s sampler sized to its budget and workers (NSGA-II population, TPE constant liar)."""
    return make_sampler(spec.sampler, seed, spec.budget.max_trials, spec.workers)


def trial_sampler(spec: SearchSpec, seed: int | None, slot: int) -> optuna.samplers.BaseSampler:
    """The sampler that proposes the trial in ``slot``: :func:`spec_sampler` seeded from (seed, slot)
    (:func:`autoprune.search.samplers.trial_seed`)."""
    return spec_sampler(spec, trial_seed(seed, slot))


def name_metrics(study: optuna.Study, names: Sequence[str]) -> None:
    """Name the objectives (the dashboard shows val_acc / macs, not Objective 0/1)."""
    import optuna

    with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(names))


def open_study(spec: SearchSpec, out_dir: Path, sampler: optuna.samplers.BaseSampler | None = None,
               create: bool = False) -> optuna.Study:
    """The study of the results folder ``out_dir``; ``create``: make it if new and check that a resumed
    one has the spec's objectives."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not create:
        return optuna.load_study(study_name=spec.study, storage=storage(out_dir), sampler=sampler)
    study = optuna.create_study(study_name=spec.study, storage=storage(out_dir), sampler=sampler,
                                directions=directions(spec), load_if_exists=True)
    saved = study.user_attrs.get("objectives")
    if saved is None:
        study.set_user_attr("objectives", list(spec.objectives))
        name_metrics(study, spec.objectives)
    elif list(saved) != list(spec.objectives):
        raise AutopruneError(f"{out_dir} holds a study with objectives {saved}, the spec asks for "
                             f"{list(spec.objectives)}; resume with the same spec or choose another --out")
    return study


# ------------------------------------------------------------------------------ outcome -> Optuna


@dataclass(frozen=True)
class Outcome:
    """How Optuna records one trial outcome (module docstring)."""

    state: TrialState
    values: list[float] | None = None  # only for COMPLETE
    constraints: dict[str, float] = field(default_factory=dict)  # name -> value (<= 0: satisfied)


def outcome(state: str, values: Sequence[float] | None, constraints: Sequence[float] = (),
            names: Sequence[str] = ()) -> Outcome:
    """Our trial state (complete | early_stopped | failed) -> Optuna's state, values and constraints;
    constraint i is named ``names[i]`` (``c<i>`` past the names given)."""
    from optuna.trial import TrialState

    if state == "complete" and values:
        kind = TrialState.COMPLETE
    elif state == "early_stopped":
        kind = TrialState.PRUNED
    else:
        kind = TrialState.FAIL
    named = {} if kind == TrialState.FAIL else {
        names[i] if i < len(names) else f"c{i}": float(v) for i, v in enumerate(constraints)}
    return Outcome(kind, [float(v) for v in values] if kind == TrialState.COMPLETE else None, named)  # type: ignore[union-attr]


def state_name(state: TrialState) -> str:
    """Optuna's state -> ours (what a trial without our ``state`` user attr is shown as)."""
    return {"COMPLETE": "complete", "PRUNED": "early_stopped", "RUNNING": "running"}.get(state.name, "failed")


def tell(study: optuna.Study, trial: optuna.Trial | int, result: Outcome) -> None:
    """Finish ``trial`` of ``study`` as ``result`` says (constraints first: Optuna reads them at tell)."""
    from optuna.trial import TrialState

    if result.constraints and not isinstance(trial, int):
        for name, value in result.constraints.items():
            trial.set_constraint(name, value)
    if result.state == TrialState.COMPLETE:
        study.tell(trial, result.values)
    else:
        study.tell(trial, state=result.state)


# ------------------------------------------------------------------------------ learning curves


def add_curve(study: optuna.Study, result: TrialResult) -> None:
    """Add ``result``'s per-epoch val accuracy to ``<study>.curves``; best effort: a failure is
    logged, never fatal to the search."""
    try:
        add_curves(study._storage, study.study_name, [(result.number, result.state, result.hparams,
                                                       result.curve, result.val_acc, result.cost)])
    except Exception as exc:  # noqa: BLE001 - the curves are for viewing; the search goes on
        log.warning("could not add trial %d's curve to %s%s: %s", result.number, study.study_name, CURVES_SUFFIX,
                    one_line(exc))


def add_curves(storage: Any, study_name: str, trials: Sequence[tuple[int, str, Mapping[str, Any], Sequence[Any],
                                                                     float | None, float | None]]) -> None:
    """(number, state, hparams, curve, val_acc, cost) of search trials -> trials of ``<study_name>.curves``
    in ``storage``: one objective (val_acc), the curve as intermediate values (epoch 1, 2, ...)."""
    import optuna

    curves = optuna.create_study(study_name=study_name + CURVES_SUFFIX, storage=storage, direction="maximize",
                                 load_if_exists=True)
    if not curves.metric_names:
        name_metrics(curves, ["val_acc"])
        curves.set_user_attr("note", f"per-epoch validation accuracy of the trials of {study_name!r}")
    for number, state_name_, hparams, curve, val_acc, cost in trials:
        done = outcome(state_name_, None if val_acc is None else [val_acc])
        attrs = {"search_trial": number, "state": state_name_, "method": hparams.get("method"),
                 "target": hparams.get("target"), "cost": cost}
        curves.add_trial(optuna.trial.create_trial(
            state=done.state, value=done.values[0] if done.values else None,
            intermediate_values={i + 1: float(a) for i, a in enumerate(curve) if a is not None},
            user_attrs={k: v for k, v in attrs.items() if v is not None}))

