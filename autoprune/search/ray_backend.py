"""The Ray Tune backend: the same search on a Ray cluster (``autoprune search SPEC --backend ray``).

Shared with the Optuna backend: the trial (:func:`autoprune.search.trial.run_trial`), the parameter
space (:func:`autoprune.search.space.suggest`, run define-by-run inside Ray's ``OptunaSearch``), the
samplers, the constraints, the two-objective early-stopping rule, the budgets and the results folder
(``trials.csv`` rows from :func:`trial.make_row`, ``models/``, ``plans/``; the runner writes the report).
Ray adds: each trial is a Ray actor holding ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs (a
fraction shares a GPU), at most ``max_concurrent`` at once, on a local Ray started in this process
(``address=None``) or on a running cluster (``"auto"`` or ``"HOST:PORT"``). Every Ray type stays in
this module and ``ray`` is imported only when the backend runs.

The state lives in the results folder, not in Ray (``<out>/ray/``, on storage every node mounts):
``trials/trial_NNNN.json`` is written by the driver when the searcher hands out a configuration
(number, parameters, Optuna parameters and distributions, run id); ``results/trial_NNNN.json`` by the
trial when it ends (state, record, per-epoch curve, cost, constraints, start and end times), or by the
driver from the reported result when the trial could not; ``tune/run_NNN/`` is Ray Tune's own folder.

Early stopping: at every epoch a trial applies :func:`early_stop.should_stop` to the curves of the
COMPLETE trials in ``results/`` (every node, every run); no single-metric Ray scheduler is used. A trial
reports to Ray once, when it ends, and the searcher tells Optuna (val_acc, cost) only for complete
trials, PRUNED for early-stopped and FAIL for failed ones: Ray's adapter would otherwise record an
early-stopped trial's partial accuracy as a finished value. The front is computed from ``trials.csv``.

Resume: the results folder is the checkpoint. A resumed search starts a new Tune run whose Optuna study
is warm-started with every finished trial; a trial that was running when the driver died (a claim
without a result) is recorded failed+interrupted, does not count against ``max_trials``, and its
configuration runs again under a new number, as in the Optuna backend. ``Tuner.restore`` is not used:
its experiment checkpoint lags by 10 s or more, so it re-runs trials that finished just before a kill
and forgets ones started after its last save, and a restored searcher that had finished refuses a
larger budget.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AutopruneError
from . import stop
from .ray_setup import RayOptions, check, connect, require_ray, resources
from .ray_store import RayStore, history, make_payload
from .results import TrialResult, constraint_names, one_line
from .store import Limits, budget_reason, finished_curves, same_config, write_rows
from .study import Outcome, outcome, spec_sampler, tell, trial_sampler
from .trial import Worker, reused_result, run_trial

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from .spec import SearchSpec

log = logging.getLogger(__name__)

METRICS = ("val_acc", "cost")  # what a trial reports to Ray; NaN unless the trial completed
_RUNS: dict[str, _Run] = {}  # live runs in this (driver) process, by results folder


# ------------------------------------------------------------------------------------------ trial


@dataclass(frozen=True)
class TrialContext:
    """What each trial needs besides its configuration (pickled to the workers)."""

    spec: SearchSpec
    out_dir: str  # absolute: Ray runs trials in their own working folders
    early_stopping: bool
    gpus: float
    threads: int


_WORKER: dict[str, Any] = {}  # the last trial's Worker, reused by the next trial in the same actor


def run_one(config: Mapping[str, Any], ctx: TrialContext) -> dict[str, Any]:
    """Run (or, when its result exists already, look up) the trial ``config`` describes; its payload."""
    meta = config["autoprune"]
    number, hparams = int(meta["number"]), dict(meta["hparams"])
    store = RayStore(ctx.out_dir)
    payload = store.result(number)
    if payload is not None:
        return payload
    started = time.time()
    try:
        prior = same_config(store, hparams, before=number)
        if prior is not None:  # run already: its result is reused and reported to the searcher again
            result = reused_result(ctx.spec, number, hparams, prior)
        else:
            worker = _load_worker(ctx)
            slot = meta.get("slot")  # a retry trains with the seed of the trial it replaces, as in the Optuna backend
            result = run_trial(worker, number, hparams, lambda: finished_curves(store), ctx.early_stopping,
                               seed_index=None if slot is None else int(slot))
    except Exception as exc:  # noqa: BLE001 - a worker that cannot load fails this trial, the search goes on
        log.warning("trial %d failed: %s", number, one_line(exc))
        result = TrialResult(number=number, state="failed", hparams=hparams, error=one_line(exc),
                             duration_s=time.time() - started, objectives=tuple(ctx.spec.objectives))
    payload = make_payload(result, meta.get("trial_id", ""), started, time.time())
    try:
        store.write_result(number, payload)
    except OSError as exc:  # the driver writes it from the report
        log.warning("trial %d: could not write its result to %s: %s", number, store.results_dir, exc)
    return payload


def _load_worker(ctx: TrialContext) -> Worker:
    import torch

    base = Path(ctx.out_dir) / "base.pt"
    if not base.is_file():
        raise AutopruneError(f"{base} is not visible on Ray node {socket.gethostname()}: put the results folder "
                             "on storage every node mounts at the same path")
    if ctx.gpus > 0:
        if not torch.cuda.is_available():
            raise AutopruneError(f"this trial holds {ctx.gpus} GPU but torch on Ray node {socket.gethostname()} "
                                 "sees no CUDA device")
        device = torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, ctx.threads))
    key = repr((ctx.out_dir, str(device), base.stat().st_mtime_ns, ctx.spec.data))
    if _WORKER.get("key") != key:
        _WORKER.clear()
        _WORKER.update(key=key, worker=Worker.load(ctx.spec, ctx.out_dir, device))
    return _WORKER["worker"]


def _trainable(config: dict, ctx: TrialContext) -> None:
    """Ray Tune function trainable: one report, when the trial ends."""
    from ray import tune

    meta = config["autoprune"]
    meta.setdefault("trial_id", tune.get_context().get_trial_id())
    payload = run_one(config, ctx)
    values = payload.get("values") or [math.nan, math.nan]
    tune.report({"number": payload["number"], "state": payload["state"], METRICS[0]: values[0],
                 METRICS[1]: values[1], "autoprune_result": json.dumps(payload, default=str)})


def _trial_name(trial: Any) -> str:
    return f"trial_{int(trial.config['autoprune']['number']):04d}"


class _Space:
    """Define-by-run space for OptunaSearch: the shared :func:`space.suggest`."""

    def __init__(self, spec: SearchSpec) -> None:
        self.spec = spec

    def __call__(self, trial: Any) -> dict[str, Any]:
        from . import space

        return {"autoprune": {"hparams": space.suggest(trial, self.spec)}}


# ------------------------------------------------------------------------------------------ driver


@dataclass
class _Run:
    """Driver-side state of one run: its store (budget and rows come from it), progress."""

    spec: SearchSpec | None
    store: RayStore
    limits: Limits
    on_update: Callable[[list[dict]], None] | None = None
    reason: str | None = None

    def budget_reason(self) -> str | None:
        return budget_reason(self.store, self.limits)

    def spent(self) -> bool:
        """A budget is spent: no new trial (the reason is kept for the run's result)."""
        reason = self.budget_reason()
        if reason is not None:
            self.reason = reason
        return reason is not None

    def claim(self, trial_id: str, hparams: Mapping[str, Any], ot_trial: Any, slot: int) -> int:
        number = self.store.claim(hparams, ot_trial, trial_id=trial_id, slot=slot)
        self.update()
        return number

    def trial_ended(self, config: Mapping[str, Any], reported: Mapping[str, Any] | None, error: str | None) -> None:
        """A Ray trial ended: make sure its result exists (a trial that could not write it reported it)."""
        number = int(config["autoprune"]["number"])
        if self.store.result(number) is None:
            if reported and reported.get("autoprune_result"):
                self.store.write_result(number, json.loads(reported["autoprune_result"]))
            elif error is not None:  # the actor died (out of memory, node lost): failed, with Ray's error
                result = TrialResult(number=number, state="failed", hparams=dict(config["autoprune"]["hparams"]),
                                     error=error, objectives=tuple(self.spec.objectives))
                self.store.record(number, result)
            # neither: stopped before it reported (the run was interrupted) -> stays a claim: interrupted
        self.update()

    def update(self) -> None:
        rows = write_rows(self.store, self.store.out_dir)
        if self.on_update is not None:
            self.on_update(rows)


def _ended(result: Mapping[str, Any] | None, error: bool, constraints: Sequence[str]) -> Outcome:
    """How a Ray trial ended, for Optuna: its reported payload's values only when it completed (never
    the partial accuracy of an early-stopped trial), its constraints unless it failed."""
    state = "failed" if error or not result else str(result.get("state", "failed"))
    if state == "failed":
        return outcome("failed", None)
    payload = json.loads(result["autoprune_result"])  # type: ignore[index]
    values = (payload.get("values") or [float(result[m]) for m in METRICS]) if state == "complete" else None  # type: ignore[index]
    return outcome(state, values, payload.get("constraints") or (), constraints)


def _tell_end(searcher: Any, trial_id: str, result: dict | None, error: bool) -> None:
    """Tell the searcher's study, once, how Ray trial ``trial_id`` ended (:func:`_ended`); best effort."""
    if trial_id in searcher._completed_trials or trial_id not in searcher._ot_trials:
        return
    searcher._completed_trials.add(trial_id)
    try:
        tell(searcher._ot_study, searcher._ot_trials[trial_id], _ended(result, error, searcher._autoprune_constraints))
    except Exception as exc:  # noqa: BLE001 - the results folder is the record; the sampler can cope
        log.warning("could not tell Optuna how Ray trial %s ended: %s", trial_id, one_line(exc))


def _slot(study: optuna.Study) -> int:
    """The slot of the next new trial: the searcher's study holds the finished trials (warm start) and
    this run's, never interrupted ones, so its size without queued retries is the slot."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING)


def _ray_classes() -> dict[str, type]:
    """The Ray subclasses, built on first use (module ``__getattr__`` makes them picklable by name)."""
    if "AutopruneSearch" not in globals():
        for cls in (_search_class(), _callback_class()):
            cls.__module__, cls.__qualname__ = __name__, cls.__name__
            globals()[cls.__name__] = cls
    return {k: globals()[k] for k in ("AutopruneSearch", "AutopruneCallback")}


def _search_class() -> type:
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class AutopruneSearch(OptunaSearch):
        """OptunaSearch with autoprune's space, budgets, numbering, warm start and outcome mapping."""

        def __init__(self, spec: SearchSpec, key: str, sampler: optuna.samplers.BaseSampler,
                     warm: Sequence[FrozenTrial] = (),
                     retry: Sequence[tuple[int, dict, dict]] = (), seed: int | None = None,
                     fixed: bool = False) -> None:
            super().__init__(space=_Space(spec), metric=list(METRICS), mode=["max", "min"], sampler=sampler)
            self._autoprune_fixed = fixed
            self._autoprune_key = key
            self._autoprune_spec, self._autoprune_seed = spec, seed
            self._autoprune_constraints = constraint_names(spec)
            self._ot_study.add_trials(list(warm))
            for _, params, attrs in retry:  # retry_of and the slot the retry keeps
                self._ot_study.enqueue_trial(params, user_attrs=attrs)

        def suggest(self, trial_id: str) -> dict | str | None:
            run = _RUNS.get(self._autoprune_key)
            if run is None or run.spent():
                return Searcher.FINISHED
            # as the Optuna backend: a sampler seeded from (seed, slot) for every trial, and a retry
            # keeps the slot (so the training seed) of the trial it replaces
            slot = _slot(self._ot_study)
            if not self._autoprune_fixed:  # a sampler object given through the Python API is used as it is
                self._ot_study.sampler = trial_sampler(self._autoprune_spec, self._autoprune_seed, slot)
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                ot_trial = self._ot_trials[trial_id]
                meta = config["autoprune"]
                meta["slot"] = int(ot_trial.user_attrs.get("slot", slot))
                meta["number"] = run.claim(trial_id, meta["hparams"], ot_trial, meta["slot"])
                meta["trial_id"] = trial_id
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            return None  # trials report once, at their end

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            _tell_end(self, trial_id, result, error)

    return AutopruneSearch


def _callback_class() -> type:
    from ray.tune import Callback

    class AutopruneCallback(Callback):
        """Keeps trials.csv and the progress bar current; records trials whose Ray actor failed."""

        def __init__(self, key: str) -> None:
            self._autoprune_key = key

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            stop.check()  # a SIGTERM whose KeyboardInterrupt was lost stops the driver at its next step

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            run = _RUNS.get(self._autoprune_key)
            if run is not None:
                run.trial_ended(trial.config, trial.last_result, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            run = _RUNS.get(self._autoprune_key)
            if run is not None:
                error = trial.get_error()
                message = one_line(error) if error is not None else "the trial's Ray actor failed"
                run.trial_ended(trial.config, None, message)

    return AutopruneCallback


def __getattr__(name: str) -> Any:
    if name in ("AutopruneSearch", "AutopruneCallback"):
        require_ray()
        return _ray_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(spec: SearchSpec, out_dir: str | Path, limits: Limits, device: Any = None, options: RayOptions | None = None,
        early_stopping: bool = True, on_update: Callable[[list[dict]], None] | None = None,
        sampler: Any = None) -> str:
    """Run trials on Ray until a budget is spent; returns why it stopped. The caller (the runner) holds the
    folder's run lock and has written spec.yaml and base.pt; ``device`` (the driver's) is not used.
    ``sampler``: an Optuna sampler object for Ray's OptunaSearch instead of ``spec.sampler`` (not re-seeded)."""
    ray = require_ray()
    import optuna
    from ray import tune

    options = options or RayOptions()
    out = Path(out_dir).resolve()
    check(out, options)
    store = RayStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    started_ray = connect(ray, options)
    key = str(out)
    try:
        cpus, gpus, concurrent = resources(spec, options, ray.cluster_resources())
        tune_dir = store.root / "tune"
        run_id = f"run_{sum(1 for p in tune_dir.glob('run_*')) if tune_dir.is_dir() else 0:03d}"
        store = RayStore(out, run_id)
        seed = None if spec.seed is None else int(spec.seed)  # re-seeded per slot, as the Optuna backend
        live = _Run(spec=spec, store=store, limits=limits, on_update=on_update)
        _RUNS[key] = live
        classes = _ray_classes()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = classes["AutopruneSearch"](spec, key, sampler or spec_sampler(spec, seed),
                                              warm=history(store, constraint_names(spec)), retry=store.retries(),
                                              seed=seed, fixed=sampler is not None)
        ctx = TrialContext(spec=spec, out_dir=str(out), early_stopping=bool(early_stopping), gpus=gpus,
                           threads=max(1, int(cpus)))
        trainable = tune.with_resources(functools.partial(_trainable, ctx=ctx), {"cpu": cpus, "gpu": gpus})
        log.info("ray %s: %d trials at once, %g CPUs and %g GPUs each", run_id, concurrent, cpus, gpus)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=concurrent,
                                        reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=run_id, storage_path=str(tune_dir), verbose=0,
                                      callbacks=[classes["AutopruneCallback"](key)],
                                      failure_config=tune.FailureConfig(max_failures=0)))
        live.update()
        quiet = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new console output prints a banner even with verbose=0
        try:
            tuner.fit()
        finally:
            if quiet is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = quiet
        return live.reason or "interrupted"
    finally:
        _RUNS.pop(key, None)
        write_rows(RayStore(out), out)
        if started_ray:
            ray.shutdown()
