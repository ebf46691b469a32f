"""The default search backend: an Optuna study in ``<out>/study.db`` (SQLite), ask/tell workers.

Each worker (the calling process, or N spawned processes with ``--workers N``) runs its own
ask -> :func:`autoprune.search.trial.run_trial` -> tell loop on the shared study, through
:class:`OptunaStore` (the :class:`~autoprune.search.store.TrialStore` over Optuna's storage: budget,
early-stopping reference, rows and importance are computed above it, in :mod:`autoprune.search.store`). An ask happens
under a file lock together with the budget check, so N workers never start more than
``max_trials`` trials; ``trials.csv`` is rewritten (atomically, under the same lock) after every trial.

How trial outcomes map onto Optuna (:func:`autoprune.search.study.outcome`, shared with the Ray
backend): complete -> values and constraints; early-stopped -> PRUNED with user attr
``state="early_stopped"``; failed -> FAIL with user attrs ``state="failed"`` and ``error``; the per-epoch
curve goes to the companion study ``<study>.curves`` (:func:`autoprune.search.study.add_curves`).

- resumed searches propose what an uninterrupted one would: before every ask the sampler is
  re-seeded from (spec seed, slot), the trial's place among non-interrupted trials, and a retried
  trial keeps the slot, and so the training seed, of the trial it replaces (:func:`autoprune.search.samplers.trial_seed`).
- interrupted (the process died or was stopped while the trial ran): FAIL with user attr
  ``interrupted=True``; it does not count towards ``max_trials`` and its configuration is enqueued
  again, so a resumed search retries it under a new number. Which RUNNING trials are stale is known
  exactly, without heartbeats: a search holds ``<out>/.run.lock`` (and its workers
  ``.workers.lock``) while it runs, so a RUNNING trial found by a search that got both locks
  belongs to a dead process.
- stopping: Ctrl-C, a dead parent (``Orphaned``) or a stop request (:mod:`autoprune.search.stop`,
  polled at each trial start and epoch end) interrupts the running trial.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..errors import AutopruneError
from . import admission, stop
from .locks import ASK_LOCK, WORKERS_LOCK, file_lock
from .results import INTERRUPTED, TrialResult, constraint_names, model_path, one_line, plan_path
from .rounds import hedge, runs_to_end
from .store import Limits, StoredTrial, TrialStore, budget_reason, finished_curves, same_config, write_rows
from .store import rows as store_rows
from .study import add_curve, open_study, outcome, spec_sampler, state_name, tell, trial_sampler
from .trial import Worker, reused_result, run_trial

if TYPE_CHECKING:
    from ..data.datasets import Dataset
    from .spec import SearchSpec

log = logging.getLogger(__name__)


MAX_REPEATS = 25  # configurations that already ran, proposed in a row, before a worker stops
STOP_GRACE_S = 120.0  # after a stop request, the seconds each worker gets before it is killed


class Orphaned(BaseException):
    """The process that started this worker is gone: stop at once (not a trial failure)."""


# ---------------------------------------------------------------------------------------- store


def next_slot(study: optuna.Study) -> int:
    """The slot of the next new trial: how many trials exist that were neither interrupted nor queued."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted"))


class OptunaStore(TrialStore):
    """The trial store over an Optuna study: outcomes are user attrs and Optuna states (module docstring)."""

    def __init__(self, study: optuna.Study, constraints: Sequence[str] = ()) -> None:
        self.study = study
        self.constraints = tuple(constraints)  # names of the constraint values, in order
        self._live: dict[int, optuna.Trial] = {}  # claimed in this process, not yet recorded

    def claim(self, hparams: Mapping[str, Any], trial: optuna.trial.BaseTrial | None = None,
              **info: Any) -> int:
        if trial is None:
            trial = self.study.ask()
        trial.set_user_attr("params", dict(hparams))
        for key, value in info.items():
            trial.set_user_attr(key, value)
        self._live[trial.number] = trial  # type: ignore[assignment]
        return trial.number

    def record(self, number: int, result: TrialResult) -> None:
        trial = self._live.pop(number)
        trial.set_user_attr("state", result.state)
        trial.set_user_attr("record", result.record())
        trial.set_user_attr("curve", list(result.curve))
        trial.set_user_attr("cost", result.cost)
        trial.set_user_attr("constraints", list(result.constraints))
        if result.error:
            trial.set_user_attr("error", result.error)
        tell(self.study, trial, outcome(result.state, result.values, result.constraints, self.constraints))
        add_curve(self.study, result)

    def interrupt(self, trial: optuna.Trial) -> None:
        """``trial`` of this process stopped (Ctrl-C, a dead parent, a storage error): interrupted."""
        self._live.pop(trial.number, None)
        mark_interrupted(self.study, trial)

    def trials(self) -> list[StoredTrial]:
        now = dt.datetime.now()
        out = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:
                continue
            a = t.user_attrs
            state = "running" if t.state == TrialState.RUNNING else a.get("state") or state_name(t.state)
            interrupted = (bool(a.get("interrupted")) or state == "interrupted"
                           or (state == "failed" and not a.get("error")))
            state = "failed" if state == "interrupted" else state  # StoredTrial: failed + interrupted
            record = a.get("record") or {}
            seconds = record.get("duration_s")  # a trial's own measure; else its wall time in the study
            if seconds is None:
                seconds = ((t.datetime_complete or now) - t.datetime_start).total_seconds() if t.datetime_start else 0.0
            cost = a.get("cost")
            out.append(StoredTrial(
                number=t.number, state=state, hparams=a.get("params") or dict(t.params), record=record,
                curve=tuple(a.get("curve") or ()), cost=None if cost is None else float(cost), seconds=float(seconds),
                interrupted=interrupted, error="" if interrupted else a.get("error", ""), retry_of=a.get("retry_of")))
        return out

    def recover(self) -> list[int]:
        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            mark_interrupted(self.study, t)
        if stale:
            log.warning("trials %s were interrupted; they will be run again", [t.number for t in stale])
        return [t.number for t in stale]

    def importance_trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def meta(self) -> dict[str, Any]:
        return dict(self.study.user_attrs)

    def set_meta(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)


def open_store(spec: SearchSpec, out_dir: Path, sampler: optuna.samplers.BaseSampler | None = None,
               create: bool = False) -> OptunaStore:
    return OptunaStore(open_study(spec, out_dir, sampler, create), constraint_names(spec))


def mark_interrupted(study: optuna.Study, t: FrozenTrial | optuna.Trial) -> None:
    """A RUNNING trial whose process stopped: FAIL + interrupted, its parameters queued to run again."""
    tid = t._trial_id
    st = study._storage
    frozen = st.get_trial(tid)
    if frozen.state != TrialState.RUNNING:
        return
    st.set_trial_user_attr(tid, "interrupted", True)
    st.set_trial_user_attr(tid, "state", "interrupted")  # what optuna-dashboard shows as its user attr
    st.set_trial_user_attr(tid, "error", INTERRUPTED)
    study.tell(frozen.number, state=TrialState.FAIL)
    if frozen.params:
        retry = {"retry_of": frozen.number}
        if frozen.user_attrs.get("slot") is not None:  # the retry takes the interrupted trial's place
            retry["slot"] = frozen.user_attrs["slot"]
        retry.update({k: frozen.user_attrs[k] for k in ("round", "hedge", "window_best") if k in frozen.user_attrs})
        study.enqueue_trial(dict(frozen.params), user_attrs=retry)


# ------------------------------------------------------------------------------------- workers


def worker_loop(spec: SearchSpec, out_dir: Path, index: int, limits: Limits, device: torch.device,
                early_stopping: bool = True, seed: int | None = None,
                on_trial: Callable[[TrialResult, list[dict]], None] | None = None,
                parent_pid: int | None = None, data: Dataset | None = None,
                sampler: optuna.samplers.BaseSampler | None = None) -> str:
    """Ask/run/tell until a budget is spent; returns the reason it stopped. ``seed``: the spec's; the
    sampler is re-seeded from it and the trial's slot before every ask (:func:`autoprune.search.samplers.trial_seed`).
    A ``sampler`` object (the Python API's) is used as given for every ask, without re-seeding."""
    from . import space  # the search-space module (owned by the spec layer)

    store = open_store(spec, out_dir, sampler=sampler or spec_sampler(spec, seed))
    study = store.study
    worker = Worker.load(spec, out_dir, device, data=data)

    def check_parent() -> None:
        if parent_pid is not None and os.getppid() != parent_pid:
            raise Orphaned()
        stop.check()

    def finished() -> list[tuple[float, list]]:
        check_parent()
        return finished_curves(store)

    ask_lock = out_dir / ASK_LOCK
    repeats, skips = 0, 0  # proposals in a row that ran nothing: reused results, trials the budget could not pay for
    while True:
        check_parent()
        trial: optuna.Trial | None = None
        result: TrialResult | None = None
        try:
            with file_lock(ask_lock):
                reason = budget_reason(store, limits) or admission.idle_reason(repeats, skips, MAX_REPEATS) or \
                    admission.stop_reason(spec, store, limits.work_seconds)
                if reason is not None:
                    return reason
                slot = next_slot(study)
                study.sampler = sampler if sampler is not None else trial_sampler(spec, seed, slot)
                trial = study.ask()
                slot = trial.user_attrs.get("slot", slot)  # a retry keeps the slot of the trial it replaces
                hparams = space.suggest(trial, spec)
                number = store.claim(hparams, trial, worker=index, slot=slot)
                result = _without_running(spec, store, number, hparams, limits.work_seconds, loud=skips == 0)
                if result is not None:  # recorded before another worker reads the store
                    store.record(number, result)
            if result is None:  # a window's best of the round and a hedge run to the end (rounds.runs_to_end)
                full = runs_to_end(trial.user_attrs)
                result = run_trial(worker, number, hparams, finished, early_stopping and not full,
                                   seed_index=slot, screen=not full)
                store.record(number, result)
                repeats, skips = 0, 0
            elif result.duplicate_of is not None:
                repeats += 1
            else:
                skips += 1
        except BaseException:  # Ctrl-C, Orphaned, storage errors: the trial is interrupted, run again later
            with contextlib.suppress(Exception):
                _abandon(store, out_dir, trial, result)
            raise
        with file_lock(ask_lock):
            hedge(worker, store, study)  # once a trial has reached the base: the round's left-out methods
            rows = write_rows(store, out_dir)
        if on_trial is not None:
            on_trial(result, rows)


def _without_running(spec: SearchSpec, store: OptunaStore, number: int, hparams: Mapping[str, Any],
                     limit_s: float | None, loud: bool) -> TrialResult | None:
    """Trial ``number``'s result when it runs nothing: the configuration already ran (reused), or the compute
    budget left cannot pay for it (not started, :mod:`.admission`); None: run it."""
    prior = same_config(store, hparams, before=number)
    if prior is not None:  # run already: reuse its result, tell the sampler the same
        return reused_result(spec, number, hparams, prior)
    fits, predicted, left = admission.admit(spec, store, hparams, limit_s)
    return None if fits else admission.skipped_result(spec, number, hparams, float(predicted or 0.0), left, loud)


def _abandon(store: OptunaStore, out_dir: Path, trial: optuna.Trial | None, result: TrialResult | None) -> None:
    """A trial stopped before its result was recorded: interrupted (it runs again), its files removed."""
    if trial is not None:
        store.interrupt(trial)
    if result is not None:  # its files exist but its result could not be recorded
        discard_files(out_dir, result.number)
    with file_lock(out_dir / ASK_LOCK):
        write_rows(store, out_dir)


def discard_files(out_dir: Path, number: int) -> None:
    """Remove a trial's saved model and plan (its result was never recorded: it runs again)."""
    for rel in (model_path(number), plan_path(number)):
        with contextlib.suppress(OSError):
            (Path(out_dir) / rel).unlink()


def _worker_main(spec: SearchSpec, out_dir: str, index: int, limits: Limits, device: str, early_stopping: bool,
                 seed: int | None, threads: int | None, parent_pid: int, log_level: int, errors: Any,
                 sampler: optuna.samplers.BaseSampler | None = None, reasons: Any = None) -> None:
    logging.basicConfig(level=log_level, format=f"%(levelname)s worker{index} %(name)s: %(message)s")
    # SIGTERM from the parent (or anyone) stops the worker like Ctrl-C; SIGINT may be ignored here
    # (a search started in the background with nohup or `&` inherits an ignored SIGINT)
    stop.clear_stop()
    signal.signal(signal.SIGTERM, stop.interrupt)
    if threads:
        torch.set_num_threads(threads)
    try:
        with file_lock(Path(out_dir) / WORKERS_LOCK, shared=True):
            reason = worker_loop(spec, Path(out_dir), index, limits, torch.device(device), early_stopping,
                                 seed, parent_pid=parent_pid, sampler=sampler)
        log.info("worker %d stopped: budget %s spent", index, reason)
        if reasons is not None:
            reasons.put((index, reason))  # the parent names it when the shared budgets do not explain the stop
    except (KeyboardInterrupt, Orphaned):
        pass
    except Exception as exc:
        log.debug("worker %d crashed", index, exc_info=True)
        errors.put((index, one_line(exc)))


def worker_devices(device: torch.device, n: int) -> list[torch.device]:
    """Worker i uses GPU i % n_gpus when the device is 'cuda' without an index and several exist."""
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i % torch.cuda.device_count()) for i in range(n)]
    return [device] * n


def run(spec: SearchSpec, out_dir: Path, limits: Limits, device: torch.device, workers: int = 1,
        early_stopping: bool = True, on_update: Callable[[list[dict]], None] | None = None,
        data: Dataset | None = None, sampler: optuna.samplers.BaseSampler | None = None) -> str:
    """Run the search with ``workers`` processes; returns why it stopped. The caller holds RUN_LOCK.
    ``sampler``: an Optuna sampler object used for every ask instead of ``spec.sampler`` (each worker
    process gets a copy)."""
    out_dir = Path(out_dir)
    with file_lock(out_dir / WORKERS_LOCK, blocking=False) as free:
        if not free:
            raise AutopruneError(f"workers of an earlier search on {out_dir} are still running; wait for "
                                 "them to finish (or end them) before resuming")
    store = open_store(spec, out_dir, create=True)
    store.recover()
    if spec.screen.enabled and spec.screen.round and store.meta().get("round") is None:
        from .rounds import run_round  # which method wins where: every one-shot method at each target window

        run_round(Worker.load(spec, out_dir, device, data=data), store, store.study)
    seed = None if spec.seed is None else int(spec.seed)  # re-seeded per slot: a resume continues the search
    try:
        if workers <= 1:
            with file_lock(out_dir / WORKERS_LOCK, shared=True):
                return worker_loop(spec, out_dir, 0, limits, device, early_stopping, seed,
                                   on_trial=None if on_update is None else (lambda r, rows: on_update(rows)),
                                   data=data, sampler=sampler)
        return _run_processes(spec, out_dir, limits, device, workers, early_stopping, seed, store, on_update,
                              sampler)
    finally:
        store.recover()
        write_rows(store, out_dir)


def _run_processes(spec: SearchSpec, out_dir: Path, limits: Limits, device: torch.device, workers: int,
                   early_stopping: bool, seed: int | None, store: OptunaStore,
                   on_update: Callable[[list[dict]], None] | None,
                   sampler: optuna.samplers.BaseSampler | None = None) -> str:
    ctx = mp.get_context("spawn")
    errors, reasons = ctx.Queue(), ctx.Queue()
    # per worker: the caller's torch threads (the CLI's --threads), never more than the cores shared out
    threads = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // workers)) if device.type == "cpu" else None
    level = logging.getLogger("autoprune").getEffectiveLevel()
    procs = [ctx.Process(target=_worker_main, name=f"autoprune-worker{i}", daemon=False,
                         args=(spec, str(out_dir), i, limits, str(dev), early_stopping, seed, threads,
                               os.getpid(), level, errors, sampler, reasons))
             for i, dev in enumerate(worker_devices(device, workers))]
    grace: float | None = None  # while stopping: how long a worker may take to mark its trial interrupted
    try:
        for p in procs:
            p.start()
        _watch(procs, store, on_update)
    except BaseException:  # Ctrl-C, or SIGTERM (the CLI's): stop the workers too, or exit would wait for them
        grace = STOP_GRACE_S
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGTERM)  # each marks its running trial interrupted and stops
        raise
    finally:
        deadline = None if grace is None else time.monotonic() + grace  # one grace period for all workers
        for p in procs:
            if p.pid is not None:
                p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if p.is_alive():  # its stop was lost: killed (its running trial is recovered as interrupted)
                    log.warning("worker %s did not stop within %.0f s of the stop request: killed", p.name, grace)
                    p.kill()
                    p.join()
    _check_workers(procs, errors)
    if on_update is not None:
        on_update(store_rows(store))
    said = []  # (worker, reason) in the order they stopped
    while not reasons.empty():
        said.append(reasons.get())
    own = said[-1][1] if len(said) == len(procs) else None  # every worker stopped on a rule of its own (e.g. exhausted)
    return budget_reason(store, limits) or admission.stop_reason(spec, store, limits.work_seconds) or own or \
        "workers stopped"


def _watch(procs: Sequence[mp.process.BaseProcess], store: OptunaStore,
           on_update: Callable[[list[dict]], None] | None) -> None:
    """Until every worker has exited: ``on_update`` with the rows whenever a trial starts or ends. Polls the
    stop request: a SIGTERM whose KeyboardInterrupt was swallowed here (e.g. inside a storage finaliser)
    still stops the workers, instead of leaving them to spend the whole budget."""
    seen = -1
    while any(p.is_alive() for p in procs):
        stop.check()
        time.sleep(1.0)
        stop.check()
        if on_update is not None:
            rows = store_rows(store)
            key = sum(1 for r in rows if r["state"] != "running") * 100000 + len(rows)
            if key != seen:
                seen = key
                on_update(rows)


def _check_workers(procs: Sequence[mp.process.BaseProcess], errors: Any) -> None:
    """Worker failures: AutopruneError when every worker failed, else an error logged naming the first."""
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for i, p in enumerate(procs):
        if p.exitcode not in (0, None) and not failures:
            failures.append((i, f"exited with code {p.exitcode}"))
    if failures:
        index, message = min(failures)
        if len(failures) == len(procs):
            raise AutopruneError(f"all {len(procs)} search workers failed; worker {index}: {message}")
        log.error("%d of %d workers failed; worker %d: %s", len(failures), len(procs), index, message)
