"""The search's front door: ``run_search(spec, out_dir, resume)`` -> results folder -> StudyResult.

Checks ``<out>`` before any compute (:mod:`autoprune.search.folder`: writable, resumable, study
storage intact), prepares it (resolved ``spec.yaml``; ``base.pt`` copied from the spec's ``base`` or
trained once and cached, its fingerprint checked against the study's), runs a backend (Optuna by default) under the spec's budgets, then computes
parameter importance and writes the report (``pareto.csv/png/html``, ``importance.csv``,
``report.md``) through :mod:`autoprune.report.tables`. See DESIGN.md section 5 and the results-folder
contract.

Budgets: ``max_trials`` counts every started trial except interrupted ones (those are retried);
``time_s`` is wall-clock time of this run's trials, from when the base model is ready (training the
base is not charged: on a slow machine it could otherwise eat the whole budget and leave no trial);
``device_hours`` is the summed wall time of all trials of the study, across resumes (each trial
holds one device, so this is time x devices in use). When a budget is spent no new trial starts,
running trials finish, and the report is written. The budget is computed from the backend's
:class:`~autoprune.search.store.TrialStore` (:func:`autoprune.search.store.budget_reason`).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.datasets import Dataset, load_data
from ..data.splits import check_split
from ..engine.cost import count_macs, count_params
from ..engine.plan import PRUNED_FORMAT, load_base, read_checkpoint, save_base
from ..errors import AutopruneError
from ..files import clean_temps
from ..models.registry import ModelSpec, create_model
from ..train import NonFiniteLoss, TrainConfig, evaluate, fit, resolve_device
from ..trust import TrustCode, TrustError, accepts_trust_code, check_name, needs_trust
from . import folder, live
from .backends import Backend, get_backend
from .locks import RUN_LOCK, file_lock
from .results import TRIALS_CSV, nan_head, one_line, read_rows
from .samplers import SAMPLERS, make_sampler
from .store import Limits, TrialStore, importance
from .store import rows as store_rows
from .study import STORAGE

if TYPE_CHECKING:
    from .ray_setup import RayOptions
    from .spec import SearchSpec

log = logging.getLogger(__name__)

RESULT_FILES = ("spec.yaml", "base.pt", STORAGE, TRIALS_CSV, "pareto.csv", "pareto.png", "pareto.html",
                "importance.csv", "report.md")


@dataclass(frozen=True)
class StudyResult:
    out_dir: Path
    study: str
    stop_reason: str  # max_trials | time | device_hours | interrupted | ...
    rows: tuple[dict[str, Any], ...]  # trials.csv rows
    front: tuple[dict[str, str], ...]  # pareto.csv rows (as read back), sorted by MACs
    base: Mapping[str, Any]  # base model metrics: val_acc, macs, params (+ latency_ms)
    files: Mapping[str, Path] = field(default_factory=dict)
    importance: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["state"]] = out.get(r["state"], 0) + 1
        return out

    @property
    def epochs_run(self) -> int:
        return sum(int(r.get("epochs_run") or 0) for r in self.rows)


def default_out_dir(spec: SearchSpec) -> Path:
    return Path("results") / spec.study


@accepts_trust_code
def run_search(spec: SearchSpec, out_dir: str | Path | None = None, resume: bool = False,
               backend: str | Backend = "optuna", progress: bool | str = True, ray_options: RayOptions | None = None,
               data: Dataset | None = None, sampler: Any = None, *, trust_code: TrustCode = None) -> StudyResult:
    """Run (or resume) the search ``spec`` describes; returns what it wrote. See the module docstring.

    ``backend``: ``optuna`` (default: embedded, ``study.db``) or ``ray`` (Ray Tune, see
    :mod:`autoprune.search.ray_backend`; ``ray_options`` is its ``RayOptions``). ``data``: the data set
    already loaded on the device (e.g. a benchmark's fixed training subset; one worker, Optuna
    backend); by default the spec's data set is loaded. ``trust_code``: the modules a
    ``package.module:function`` model may import (:mod:`autoprune.trust`), in this process and its workers.
    ``progress``: the live display (:func:`view_mode`): the search line and each running trial's phase,
    on stderr. ``sampler``: an Optuna sampler object used instead of ``spec.sampler`` (see
    :func:`autoprune.search.api.search`).
    """
    start = time.time()
    out = out_dir if out_dir is not None else default_out_dir(spec)
    search_backend = get_backend(backend)
    _check_before_compute(spec, out, resume, search_backend, sampler, ray_options)
    _preload_report()
    budget = spec.budget
    out = folder.check_out(out)
    with file_lock(out / RUN_LOCK, blocking=False) as free:
        if not free:
            raise AutopruneError(f"another search is running on {out}; wait for it or choose another --out")
        folder.prepare(spec, out, resume, search_backend)
        clean_temps(out, ("models", "plans"))  # what a killed or failed write left (we hold the run lock)
        _dump_spec(spec, out / "spec.yaml")
        device = resolve_device(spec.device)
        data = load_data(spec.data, device) if data is None else data
        base = prepare_base(spec, out, data, device, progress)
        folder.check_fingerprint(search_backend.open_store(spec, out, create=True),
                                 folder.fingerprint(out / "base.pt", data), out, spec)
        trials_start = time.time()  # the time budget starts once the base model is ready
        limits = Limits(
            max_trials=budget.max_trials,
            deadline=None if budget.time_s is None else trials_start + float(budget.time_s),
            device_seconds=None if budget.device_hours is None else float(budget.device_hours) * 3600.0,
            work_seconds=budget.compute_s)
        workers = max(1, int(spec.workers or 1))
        if workers > 1:  # each worker loads its own copy on its own device
            data = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        kept = sum(live.counted(r) for r in read_rows(out / TRIALS_CSV))
        view = live.SearchView(spec, out, mode=view_mode(progress), deadline=limits.deadline,
                               already_done=kept).start()
        reason = "interrupted"
        try:
            reason = search_backend.run(spec, out, limits, device, workers=workers,
                                        early_stopping=bool(spec.early_stop.enabled), on_update=view.update,
                                        data=data, options=ray_options, sampler=sampler)
        except BaseException:
            view.close()
            try:  # a stopped search still leaves its report
                _finish(spec, out, base, search_backend, with_importance=False)
            except Exception as exc:  # noqa: BLE001 - do not hide the error that stopped the search
                log.warning("could not write the report of the stopped search: %s", exc)
            raise
        view.close()
        rows, imp = _finish(spec, out, base, search_backend, with_importance=True)
    log.info("search %s stopped (%s): %d trials in %.0f s (base model %.0f s)", spec.study, reason, len(rows),
             time.time() - start, trials_start - start)
    files = {name: out / name for name in RESULT_FILES if (out / name).exists()}
    return StudyResult(out_dir=out, study=spec.study, stop_reason=reason, rows=tuple(rows),
                       front=tuple(read_rows(out / "pareto.csv")), base=base, files=files, importance=imp)


def _check_before_compute(spec: SearchSpec, out: str | Path, resume: bool, search_backend: Backend, sampler: Any,
                          ray_options: RayOptions | None) -> None:
    """What must hold before anything is written or computed: a trusted model name, a budget, a known
    sampler that fits it, a folder this backend can use, and something to resume."""
    if needs_trust(spec.model):
        try:
            check_name(spec.model)
        except TrustError as exc:
            raise TrustError(f"{spec.source}: {exc}") from None
    budget = spec.budget
    if budget.max_trials is None and budget.time_s is None and budget.device_hours is None and budget.compute_s is None:
        raise AutopruneError(f"search {spec.study!r} has no budget; set budget.max_trials, budget.time_s or "
                             f"budget.device_hours in {spec.source}, or pass --max-trials / --time-budget")
    if sampler is None:  # unknown sampler, too small a budget
        make_sampler(spec.sampler, 0, spec.budget.max_trials, spec.workers)
    elif not isinstance(sampler, _optuna_sampler_type()):
        raise AutopruneError(f"sampler={sampler!r} is not an Optuna sampler; give a name ({', '.join(SAMPLERS)}) "
                             "or an optuna.samplers.BaseSampler")
    search_backend.check(Path(out), ray_options)
    if resume and os.fspath(out).strip() and not Path(out).exists():
        raise AutopruneError(f"--resume: {out} does not exist, so there is no search to continue; check --out, or "
                             "drop --resume to start a new search there")


def _optuna_sampler_type() -> type:
    import optuna

    return optuna.samplers.BaseSampler


def view_mode(progress: bool | str | None) -> str | None:
    """``run_search``'s ``progress`` as a :class:`~autoprune.search.live.SearchView` mode: True or "auto"
    (bars on a terminal, lines otherwise), "bars", "lines", or False / None (nothing shown)."""
    if progress is True or progress == "auto":
        return "auto"
    if progress in ("bars", "lines"):
        return str(progress)
    if progress in (False, None, "none"):
        return None
    raise AutopruneError(f"progress={progress!r}: use True, False, 'auto', 'bars' or 'lines'")


def open_store(spec: SearchSpec, out: Path, backend: str | Backend, create: bool = False) -> TrialStore:
    """The trial store of the results folder ``out`` (as the backend ``backend`` keeps it)."""
    return get_backend(backend).open_store(spec, out, create=create)


def _finish(spec: SearchSpec, out: Path, base: Mapping[str, Any], backend: Backend, with_importance: bool
            ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Rows of every trial, parameter importance, and the report (trials.csv is the backend's)."""
    store = backend.open_store(spec, out)
    rows = store_rows(store)
    backend.finish(spec, out, store)
    imp = importance(store, spec.objectives) if with_importance else {}
    _write_report(out, base, imp or None)
    return rows, imp


def _dump_spec(spec: SearchSpec, path: Path) -> None:
    from .spec import dump_spec

    dump_spec(spec, path)


def prepare_base(spec: SearchSpec, out: Path, data: Dataset, device: torch.device,
                 progress: bool = False) -> dict[str, Any]:
    """``<out>/base.pt`` with metrics {val_acc, macs, params}: reused, copied from ``spec.base`` or trained."""
    path = out / "base.pt"
    shape = (data.in_channels, data.image_size, data.image_size)
    model_spec = ModelSpec(name=spec.model, num_classes=data.num_classes, in_channels=data.in_channels,
                           image_size=data.image_size, output=spec.output)
    metrics: dict[str, Any] = {}
    if path.exists():
        model, ckpt = load_base(path, device)
        metrics = dict(ckpt.get("metrics") or {})
        if not {"val_acc", "macs", "params"} <= set(metrics):
            metrics = {}
    if not metrics:
        model = _load_given_base(spec, model_spec) if spec.base else _train_base(spec, model_spec, data, device,
                                                                                   progress)
        model.to(device)
        metrics = {"val_acc": evaluate(model, data.val, device)["acc"], "macs": count_macs(model, shape, device),
                   "params": count_params(model)}
        if not spec.base and spec.base_epochs > 0:
            metrics["augment"] = list(spec.augment)  # what the base was trained with (trials: spec.yaml)
        save_base(path, model, model_spec, spec.data, metrics)
        log.info("base model: val_acc %.4f, %d MACs, %d params -> %s", metrics["val_acc"], metrics["macs"],
                 metrics["params"], path)
    if "latency" in spec.objectives:  # the report's base row; each worker measures it again for its trials
        from ..engine.latency import measure_models
        from . import latency_objective

        cfg = latency_objective.config(spec, device)
        metrics["latency_ms"] = measure_models([model], shape, cfg, "base latency")[0]
        metrics.update(latency_objective.record(cfg))
    return metrics


def _train_base(spec: SearchSpec, model_spec: ModelSpec, data: Dataset, device: torch.device,
                progress: bool) -> torch.nn.Module:
    """The spec's model trained for ``base_epochs`` from a seeded initialisation (the same seed gives the
    same base model); a training failure is one line naming what to change."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.seed or 0))
        model = _build(spec, model_spec)
    if spec.base_epochs <= 0:
        log.warning("base_epochs is 0 and no base checkpoint is given: pruning an untrained model")
        return model
    log.info("training the base model %s for %d epochs", spec.model, spec.base_epochs)
    label = f"base model: train {spec.model} on {spec.data.name}"  # the reporter adds the count and ETA
    cfg = TrainConfig(epochs=int(spec.base_epochs), lr=float(spec.base_lr), seed=int(spec.seed or 0),
                      augment=spec.augment)
    try:
        fit(model, data.train, data.val, cfg, device, progress=label)
    except NonFiniteLoss as exc:
        raise AutopruneError(f"training the base model failed: {nan_head(exc)}; lower base_lr in "
                             f"{spec.source}, or give a trained checkpoint as base:") from None
    except (AutopruneError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a user model whose forward raises: one line, -v for the traceback
        log.debug("training %s failed", spec.model, exc_info=True)
        raise AutopruneError(f"training the base model {spec.model!r} failed: {one_line(exc)} "
                             "(-v shows the traceback)") from None
    return model


def _build(spec: SearchSpec, model_spec: ModelSpec) -> torch.nn.Module:
    """The spec's model, untrained; a model function that raises is one line naming it (-v: the traceback)."""
    try:
        return create_model(model_spec)
    except AutopruneError:
        raise
    except Exception as exc:  # a user's package.module:function may raise anything
        log.debug("building %s failed", spec.model, exc_info=True)
        raise AutopruneError(f"model {spec.model!r} could not be built: {one_line(exc)}; fix the model function "
                             f"or the spec's model in {spec.source} (-v shows the traceback)") from None


def _load_given_base(spec: SearchSpec, model_spec: ModelSpec) -> torch.nn.Module:
    ckpt = read_checkpoint(spec.base)
    if ckpt["format"] == PRUNED_FORMAT:
        raise AutopruneError(f"base checkpoint {spec.base} is a pruned model; give the unpruned base model")
    saved = ModelSpec.from_dict(ckpt["model"])
    if saved != model_spec:
        raise AutopruneError(f"base checkpoint {spec.base} holds {saved}, the spec needs {model_spec}; fix the "
                             "spec's model/data or the base path")
    check_split(ckpt, spec.data, f"base checkpoint {spec.base}")  # its training set must not hold our val/test
    model, _ = load_base(spec.base, "cpu")
    return model


def _preload_report() -> None:
    """Import the report's libraries (pandas, matplotlib) before the trials: a search whose trials used all
    the memory there is must not then fail to import them (issue 30: a MemoryError after 8 good trials)."""
    from matplotlib.figure import Figure  # noqa: F401

    from ..report import tables  # noqa: F401


def _write_report(out: Path, base: Mapping[str, Any], importance: Mapping[str, Any] | None) -> None:
    from ..report import tables as report

    try:
        report.write_report(out, dict(base), importance)
    except MemoryError:
        raise AutopruneError(f"out of memory while writing the report; the trials are safe in {out} (trials.csv, "
                             f"study.db): write the report later with `autoprune pareto {out}`") from None

