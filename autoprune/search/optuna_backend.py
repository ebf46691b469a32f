"""The default search backend: an Optuna study in ``<out>/study.db`` (SQLite), ask/tell workers.

Each worker (the calling process, or N spawned processes with ``--workers N``) runs its own
ask -> :func:`autoprune.search.trial.run_trial` -> tell loop on the shared study. An ask happens
under a file lock together with the budget check, so N workers never start more than
``max_trials`` trials; ``trials.csv`` is rewritten (atomically, under the same lock) after every trial.

How trial outcomes map onto Optuna:

- complete: ``tell(values=[val_acc, cost])``; constraints via ``trial.set_constraint`` (Optuna 5's
  replacement for the sampler's ``constraints_func``; every sampler then sees feasibility).
- early-stopped: ``tell(state=PRUNED)`` with user attr ``state="early_stopped"``. Multi-objective
  studies reject Optuna's pruners, but a PRUNED trial is still the honest state: it has no values,
  never enters ``study.best_trials``, and TPE counts it among the bad trials.
- failed: ``tell(state=FAIL)`` with user attrs ``state="failed"`` and ``error``.
- per-epoch validation accuracy: Optuna's ``trial.report`` (and so the dashboard's learning curves)
  exists only for single-objective studies, so every trial is also added to a companion study
  ``<study>.curves`` in the same ``study.db`` (one objective, val_acc) with the curve as its
  intermediate values and the search trial's number, method, target and cost as user attrs;
  optuna-dashboard plots those curves. The main study names its metrics (``set_metric_names``).
- interrupted (the process died or was stopped while the trial ran): FAIL with user attr
  ``interrupted=True``; it does not count towards ``max_trials`` and its configuration is enqueued
  again, so a resumed search retries it under a new number. Which RUNNING trials are stale is known
  exactly, without heartbeats: a search holds ``<out>/.run.lock`` (and its workers
  ``.workers.lock``) while it runs, so a RUNNING trial found by a search that got both locks
  belongs to a dead process.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..errors import AutopruneError
from . import trial as trial_mod
from .trial import TrialResult, Worker, make_row, run_trial, write_trials_csv

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-process searches only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STORAGE = "study.db"
ASK_LOCK = ".ask.lock"
RUN_LOCK = ".run.lock"
WORKERS_LOCK = ".workers.lock"
SAMPLERS = ("tpe", "nsga2", "random")
_STATE_OF = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "early_stopped", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running"}


@dataclass(frozen=True)
class Limits:
    max_trials: int | None = None
    deadline: float | None = None  # time.time() after which no trial starts
    device_seconds: float | None = None  # sum of trial wall times (time x devices in use)


class Orphaned(BaseException):
    """The process that started this worker is gone: stop at once (not a trial failure)."""


# ---------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """flock on ``path``; yields False when non-blocking and someone else holds it."""
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- study


def storage(out_dir: Path) -> optuna.storages.RDBStorage:
    url = f"sqlite:///{(Path(out_dir) / STORAGE).resolve()}"
    # SQLite serialises writers; a generous busy timeout lets N workers share the file.
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 300}})


def directions(spec: Any) -> list[str]:
    return ["maximize", "minimize"]  # objectives are (val_acc, macs | params | latency)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # multi-objective TPE (Ozaki et al. 2022); constant liar for parallel workers
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AutopruneError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")


def trial_seed(seed: int | None, slot: int) -> int | None:
    """The sampler's seed for the trial in ``slot`` (its place among non-interrupted trials).

    A fresh sampler seeded from (spec seed, slot) for every ask makes the proposals a function of
    the seed and the study's history alone, so a killed and resumed search proposes what the
    uninterrupted one would (the samplers keep no other state between trials: TPE, NSGA-II and
    random sampling rebuild everything from the stored trials). None stays unseeded.
    """
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(slot)]).generate_state(1)[0] & 0x7FFFFFFF)


def next_slot(study: optuna.Study) -> int:
    """The slot of the next new trial: how many trials exist that were neither interrupted nor queued."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted"))


def open_study(spec: Any, out_dir: Path, sampler: optuna.samplers.BaseSampler | None = None,
               create: bool = False) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if create:
        study = optuna.create_study(study_name=spec.study, storage=storage(out_dir), sampler=sampler,
                                    directions=directions(spec), load_if_exists=True)
        saved = study.user_attrs.get("objectives")
        if saved is None:
            study.set_user_attr("objectives", list(spec.objectives))
            with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(spec.objectives))  # the dashboard: val_acc / macs, not Objective 0/1
        elif list(saved) != list(spec.objectives):
            raise AutopruneError(f"{out_dir} holds a study with objectives {saved}, the spec asks for "
                                 f"{list(spec.objectives)}; resume with the same spec or choose another --out")
        return study
    return optuna.load_study(study_name=spec.study, storage=storage(out_dir), sampler=sampler)


CURVES_SUFFIX = ".curves"


def add_curve(study: optuna.Study, result: TrialResult) -> None:
    """Add ``result``'s per-epoch val accuracy to the companion study ``<study>.curves`` (see the module
    docstring); best effort: a failure is logged, never fatal to the search."""
    try:
        curves = optuna.create_study(study_name=study.study_name + CURVES_SUFFIX, storage=study._storage,
                                     direction="maximize", load_if_exists=True)
        if not curves.metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                curves.set_metric_names(["val_acc"])
            curves.set_user_attr("note", f"per-epoch validation accuracy of the trials of {study.study_name!r}")
        state = {"complete": TrialState.COMPLETE, "early_stopped": TrialState.PRUNED}.get(result.state,
                                                                                          TrialState.FAIL)
        attrs = {"search_trial": result.number, "state": result.state, "method": result.hparams.get("method"),
                 "target": result.hparams.get("target"), "cost": result.cost}
        curves.add_trial(optuna.trial.create_trial(
            state=state, value=float(result.val_acc) if state == TrialState.COMPLETE else None,
            intermediate_values={i + 1: float(a) for i, a in enumerate(result.curve) if a is not None},
            user_attrs={k: v for k, v in attrs.items() if v is not None}))
    except Exception as exc:  # noqa: BLE001 - the curves are for viewing; the search goes on
        log.warning("could not add trial %d's curve to %s%s: %s", result.number, study.study_name, CURVES_SUFFIX,
                    trial_mod.one_line(exc))


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials (their process is dead) failed+interrupted and enqueue them again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        mark_interrupted(study, t)
    if stale:
        log.warning("trials %s were interrupted; they will be run again", [t.number for t in stale])
    return [t.number for t in stale]


def mark_interrupted(study: optuna.Study, t: FrozenTrial | optuna.Trial) -> None:
    tid = t._trial_id
    st = study._storage
    frozen = st.get_trial(tid)
    if frozen.state != TrialState.RUNNING:
        return
    st.set_trial_user_attr(tid, "interrupted", True)
    st.set_trial_user_attr(tid, "state", "failed")
    st.set_trial_user_attr(tid, "error", trial_mod.INTERRUPTED)
    study.tell(frozen.number, state=TrialState.FAIL)
    if frozen.params:
        retry = {"retry_of": frozen.number}
        if frozen.user_attrs.get("slot") is not None:  # the retry takes the interrupted trial's place
            retry["slot"] = frozen.user_attrs["slot"]
        study.enqueue_trial(dict(frozen.params), user_attrs=retry)


# ------------------------------------------------------------------------------------- reading


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """``trials.csv`` rows for every started trial (queued retries are not rows yet)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        attrs = t.user_attrs
        state = "running" if t.state == TrialState.RUNNING else attrs.get("state") or _STATE_OF.get(t.state, "failed")
        error = attrs.get("error", "")
        if state == "failed" and not error:
            error = trial_mod.INTERRUPTED
        rows.append(make_row(t.number, state, attrs.get("params") or dict(t.params), attrs.get("record"), error))
    return rows


def finished_curves(study: optuna.Study) -> list[tuple[float, list]]:
    """(cost, per-epoch val acc) of the completed trials: the early-stopping rule's reference."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "curve" in t.user_attrs and t.user_attrs.get("cost") is not None:
            out.append((float(t.user_attrs["cost"]), list(t.user_attrs["curve"])))
    return out


def budget_reason(study: optuna.Study, limits: Limits) -> str | None:
    """Why no new trial may start now ('max_trials', 'time', 'device_hours'), or None."""
    if limits.deadline is not None and time.time() >= limits.deadline:
        return "time"
    trials = study.get_trials(deepcopy=False)
    if limits.max_trials is not None:
        used = [t for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted")]
        if len(used) >= limits.max_trials:
            return "max_trials"
    if limits.device_seconds is not None and device_seconds_used(trials) >= limits.device_seconds:
        return "device_hours"
    return None


def device_seconds_used(trials: Sequence[FrozenTrial]) -> float:
    now = dt.datetime.now()
    return sum(((t.datetime_complete or now) - t.datetime_start).total_seconds()
               for t in trials if t.datetime_start is not None)


def importance(study: optuna.Study, objectives: Sequence[str]) -> dict[str, dict[str, float]]:
    """Optuna parameter importance per objective; {} when there is too little to say."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        log.info("parameter importance needs at least 2 complete trials (have %d)", len(complete))
        return {}
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
        except Exception as exc:  # noqa: BLE001 - conditional/constant params make evaluators fail
            log.warning("parameter importance for %s unavailable: %s", name, trial_mod.one_line(exc))
            continue
        out[name] = {k: float(v) for k, v in imp.items()}
    return out


# ------------------------------------------------------------------------------------- workers


def tell(study: optuna.Study, trial: optuna.Trial, result: TrialResult, names: Sequence[str] = ()) -> None:
    """Store ``result`` on ``trial`` (user attrs, named constraints) and finish it in Optuna."""
    trial.set_user_attr("state", result.state)
    trial.set_user_attr("record", result.record())
    trial.set_user_attr("curve", list(result.curve))
    trial.set_user_attr("cost", result.cost)
    trial.set_user_attr("constraints", list(result.constraints))
    if result.error:
        trial.set_user_attr("error", result.error)
    if result.state in ("complete", "early_stopped"):
        for i, value in enumerate(result.constraints):
            trial.set_constraint(names[i] if i < len(names) else f"c{i}", value)
    if result.state == "complete":
        study.tell(trial, list(result.values))  # type: ignore[arg-type]
    elif result.state == "early_stopped":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    add_curve(study, result)


def worker_loop(spec: Any, out_dir: Path, index: int, limits: Limits, device: torch.device,
                early_stopping: bool = True,
                on_trial: Callable[[TrialResult, list[dict]], None] | None = None,
                parent_pid: int | None = None, data: Any = None) -> str:
    """Ask/run/tell until a budget is spent; returns the reason it stopped."""
    from . import space  # the search-space module (owned by the spec layer)

    study = open_study(spec, out_dir, sampler=make_sampler(spec.sampler, None))
    worker = Worker.load(spec, out_dir, device, data=data)

    def check_parent() -> None:
        if parent_pid is not None and os.getppid() != parent_pid:
            raise Orphaned()

    def finished() -> list[tuple[float, list]]:
        check_parent()
        return finished_curves(study)

    ask_lock = out_dir / ASK_LOCK
    while True:
        check_parent()
        with file_lock(ask_lock):
            reason = budget_reason(study, limits)
            if reason is not None:
                return reason
            slot = next_slot(study)
            study.sampler = make_sampler(spec.sampler, trial_seed(spec.seed, slot))
            trial = study.ask()
            slot = trial.user_attrs.get("slot", slot)  # a retry keeps the slot of the trial it replaces
            try:
                hparams = space.suggest(trial, spec)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            trial.set_user_attr("params", hparams)
            trial.set_user_attr("worker", index)
            trial.set_user_attr("slot", slot)
        try:
            result = run_trial(worker, trial.number, hparams, finished, early_stopping, seed_index=slot)
            tell(study, trial, result, trial_mod.constraint_names(spec))
        except BaseException:  # KeyboardInterrupt, Orphaned, storage errors: the trial is interrupted
            with contextlib.suppress(Exception):
                mark_interrupted(study, trial)
                with file_lock(ask_lock):
                    write_trials_csv(out_dir / "trials.csv", trial_rows(study))
            raise
        with file_lock(ask_lock):
            rows = trial_rows(study)
            write_trials_csv(out_dir / "trials.csv", rows)
        if on_trial is not None:
            on_trial(result, rows)


def _worker_main(spec: Any, out_dir: str, index: int, limits: Limits, device: str, early_stopping: bool,
                 threads: int | None, parent_pid: int, log_level: int, errors: Any) -> None:
    logging.basicConfig(level=log_level, format=f"%(levelname)s worker{index} %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        with file_lock(Path(out_dir) / WORKERS_LOCK, shared=True):
            reason = worker_loop(spec, Path(out_dir), index, limits, torch.device(device), early_stopping,
                                 parent_pid=parent_pid)
        log.info("worker %d stopped: budget %s spent", index, reason)
    except (KeyboardInterrupt, Orphaned):
        pass
    except Exception as exc:
        log.debug("worker %d crashed", index, exc_info=True)
        errors.put((index, trial_mod.one_line(exc)))


def worker_devices(device: torch.device, n: int) -> list[torch.device]:
    """Worker i uses GPU i % n_gpus when the device is 'cuda' without an index and several exist."""
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i % torch.cuda.device_count()) for i in range(n)]
    return [device] * n


def run(spec: Any, out_dir: Path, limits: Limits, device: torch.device, workers: int = 1,
        early_stopping: bool = True, on_update: Callable[[list[dict]], None] | None = None,
        data: Any = None) -> str:
    """Run the search with ``workers`` processes; returns why it stopped. The caller holds RUN_LOCK."""
    out_dir = Path(out_dir)
    with file_lock(out_dir / WORKERS_LOCK, blocking=False) as free:
        if not free:
            raise AutopruneError(f"workers of an earlier search on {out_dir} are still running; wait for "
                                 "them to finish (or end them) before resuming")
    study = open_study(spec, out_dir, create=True)
    recover_interrupted(study)
    try:
        if workers <= 1:
            with file_lock(out_dir / WORKERS_LOCK, shared=True):
                return worker_loop(spec, out_dir, 0, limits, device, early_stopping,
                                   on_trial=None if on_update is None else (lambda r, rows: on_update(rows)),
                                   data=data)
        return _run_processes(spec, out_dir, limits, device, workers, early_stopping, study,
                              on_update)
    finally:
        recover_interrupted(study)
        write_trials_csv(out_dir / "trials.csv", trial_rows(study))


def _run_processes(spec: Any, out_dir: Path, limits: Limits, device: torch.device, workers: int,
                   early_stopping: bool, study: optuna.Study,
                   on_update: Callable[[list[dict]], None] | None) -> str:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    # per worker: the caller's torch threads (the CLI's --threads), never more than the cores shared out
    threads = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // workers)) if device.type == "cpu" else None
    level = logging.getLogger("autoprune").getEffectiveLevel()
    procs = [ctx.Process(target=_worker_main, name=f"autoprune-worker{i}", daemon=False,
                         args=(spec, str(out_dir), i, limits, str(dev), early_stopping, threads,
                               os.getpid(), level, errors))
             for i, dev in enumerate(worker_devices(device, workers))]
    for p in procs:
        p.start()
    seen = -1
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            if on_update is not None:
                rows = trial_rows(study)
                key = sum(1 for r in rows if r["state"] != "running") * 100000 + len(rows)
                if key != seen:
                    seen = key
                    on_update(rows)
    finally:
        for p in procs:
            p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for p in procs:
        if p.exitcode not in (0, None) and not failures:
            failures.append((procs.index(p), f"exited with code {p.exitcode}"))
    if failures:
        index, message = min(failures)
        if len(failures) == len(procs):
            raise AutopruneError(f"all {len(procs)} search workers failed; worker {index}: {message}")
        log.error("%d of %d workers failed; worker %d: %s", len(failures), len(procs), index, message)
    if on_update is not None:
        on_update(trial_rows(study))
    return budget_reason(study, limits) or "workers stopped"
