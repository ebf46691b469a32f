"""One search trial, shared by every backend: prune -> fine-tune -> evaluate -> record -> save.

A :class:`Worker` holds what a worker process loads once (data on its device, the base model, its
channel groups); :func:`run_trial` runs one sampled configuration on it and returns a
:class:`TrialResult` whether the trial completes, is early-stopped or fails. Backends only decide
which configuration to run next and where to store the result (:mod:`autoprune.search.store`); the
trial itself, the early-stopping rule and the saved files live here, what a result means on disk
(constraints, ``trials.csv`` rows) in :mod:`autoprune.search.results`.

Training budget: a trial has ``epochs`` = E epochs in all; a training-time method (ResRep) gets
``k = method.training_epochs(params, E)`` of them while pruning, the model is fine-tuned E - k
epochs after surgery. Epochs in curves and in the early-stopping rule count from the start of the
trial, so a ResRep trial's first fine-tune epoch is epoch k + 1. Every epoch, the method's and the
fine-tune's, goes through one path (``_Epochs.end``): during its k epochs ResRep's reading is the model
it would return at that point (its final mask of that point applied, BN statistics re-estimated) with
that model's cost, so early stopping stops it there like any other trial; the engine then finalizes
that model and the trial records it like every early-stopped trial. The test split is never touched.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.datasets import Dataset, load_data
from ..engine import pruning as engine
from ..engine.graph import ChannelGroup, find_groups
from ..engine.latency import measure_models
from ..engine.plan import load_base, save_pruned
from ..engine.trace import trace_batches
from ..files import FileWriteError, user_error, write_json
from ..methods import get_method, make_params
from ..models.registry import ModelSpec
from ..progress import phase
from ..report.pareto import OBJECTIVE_COLUMNS
from ..train import Callbacks, NonFiniteLoss, TrainConfig, evaluate, fit
from . import early_stop, latency_objective, phase_files, stop
from .distillation import distillation
from .results import TrialResult, constraint_values, model_path, nan_head, one_line, plan_path

if TYPE_CHECKING:
    from ..engine.pruning import PruneResult
    from .spec import SearchSpec
    from .store import StoredTrial

log = logging.getLogger(__name__)

Finished = Callable[[], "early_stop.Reference | Sequence[early_stop.Peer | tuple]"]


@dataclass
class Worker:
    """Per-process state, loaded once: data on the device, base model, channel groups, base metrics."""

    spec: SearchSpec
    out_dir: Path
    device: torch.device
    data: Dataset
    model: nn.Module
    model_spec: ModelSpec
    groups: list[ChannelGroup]
    base: dict[str, Any]  # val_acc, macs, params (+ latency_ms when latency is an objective)
    latency: Any = None  # objective latency: the LatencyModel of this device (autoprune.engine.latency)
    latency_cfg: Any = None  # and the LatencyConfig it was measured with
    _teacher_acc: float | None = field(default=None, init=False, repr=False)

    def teacher_acc(self) -> float:
        """The base model's accuracy on this search's validation split (the distillation teacher's), measured
        once per worker (a base file's recorded metrics may come from another split)."""
        if self._teacher_acc is None:
            self._teacher_acc = float(evaluate(self.model, self.data.val, self.device)["acc"])
        return self._teacher_acc

    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = self.model_spec
        return (s.in_channels, s.image_size, s.image_size)

    @classmethod
    def load(cls, spec: SearchSpec, out_dir: str | Path, device: torch.device,
             data: Dataset | None = None) -> Worker:
        out_dir = Path(out_dir)
        model, ckpt = load_base(out_dir / "base.pt", device)
        model_spec = ModelSpec.from_dict(ckpt["model"])
        if data is None:
            data = load_data(spec.data, device)
        if spec.train_subset is not None:  # trials see a fixed part of the training split
            from ..data.datasets import subset_split

            data = replace(data, train=subset_split(data.train, spec.train_subset, seed=spec.data.seed))
        shape = (model_spec.in_channels, model_spec.image_size, model_spec.image_size)
        groups = find_groups(model, shape, batches=trace_batches(data, device))  # real batches: data-chosen branches
        base = dict(ckpt.get("metrics") or {})
        residual, modes = spec.space.get("residual"), spec.space.get("allocation")
        searched = "searched" in (modes if isinstance(modes, list) else [modes])
        if searched and not isinstance(residual, (int, float)) and not any(g.prunable and g.residual for g in groups):
            log.warning("%s: space.residual is searched but %s has no prunable residual-coupled channel group; "
                        "set residual: 0 so the sampler does not spend a dimension on it", spec.source,
                        model_spec.name)
        lm = lat_cfg = None
        if "latency" in spec.objectives:  # device-specific: measured by each worker on its own device
            lat_cfg = latency_objective.config(spec, device)
            others = spec.workers > 1
            lm = latency_objective.build_for_worker(out_dir, model, groups, shape, lat_cfg, others)
            with latency_objective.measuring(out_dir, others):
                base["latency_ms"] = measure_models([model], shape, lat_cfg, "base latency")[0]
            base.update(latency_objective.record(lat_cfg, lm.base))
            latency_objective.warn_unreachable(spec, groups, lm)
        log.info("worker ready on %s: %s, %d prunable channel groups, base val_acc %.4f, %d MACs", device,
                 model_spec.name, sum(g.prunable for g in groups), base.get("val_acc", math.nan),
                 base.get("macs", 0))
        return cls(spec=spec, out_dir=out_dir, device=device, data=data, model=model, model_spec=model_spec,
                   groups=groups, base=base, latency=lm, latency_cfg=lat_cfg)


@dataclass
class _Progress:
    """What a trial has measured so far (kept when it fails half-way)."""

    curve: list[float | None] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0
    phases: tuple[str, ...] = ()


def run_trial(worker: Worker, number: int, hparams: Mapping[str, Any], finished: Finished | None = None,
              early_stopping: bool = True, seed_index: int | None = None, screen: bool = True) -> TrialResult:
    """Run one configuration; never raises for a trial-level problem (it becomes state ``failed``).

    ``screen=False``: the fidelity screen does not apply (a hedge, :func:`autoprune.search.rounds.hedge`).
    Training is seeded with ``spec.seed + seed_index`` (default: the trial number); the Optuna
    backend passes the trial's slot, so a retried trial trains as the one it replaces.

    ``finished()`` returns the :class:`~.early_stop.Reference` of the trials so far (read at every epoch,
    so trials finishing in other workers count at once). KeyboardInterrupt propagates, and so does a
    :class:`~autoprune.files.FileWriteError` (a full disk or read-only folder fails every trial alike).
    """
    start = time.perf_counter()
    clock = work_clock(worker.device)
    work_start = clock()
    progress = _Progress()
    try:
        with phase_files.trial_progress(worker.out_dir, number, hparams):  # what the search display shows of it
            result = _run(worker, number, dict(hparams), finished, early_stopping, progress, start,
                          number if seed_index is None else seed_index, screen)
        result = replace(result, work_s=clock() - work_start)
    except Exception as exc:
        if isinstance(exc, FileWriteError) or isinstance(user_error(exc), FileWriteError):
            raise (exc if isinstance(exc, FileWriteError) else user_error(exc)) from None  # no trial can fix it
        message = _message(exc, worker, hparams)
        log.warning("trial %d failed: %s", number, message)
        log.debug("trial %d traceback", number, exc_info=True)
        del exc
        result = TrialResult(number=number, state="failed", hparams=dict(hparams), error=message,
                             epochs_run=progress.epochs_run, duration_s=time.perf_counter() - start,
                             curve=tuple(progress.curve), objectives=tuple(worker.spec.objectives),
                             phases=progress.phases, work_s=clock() - work_start, **progress.measured)
        _free_memory(worker.device)
    return result


def work_clock(device: torch.device) -> Callable[[], float]:
    """A clock of measured work in seconds: CUDA-synchronised wall time on a GPU (queued kernels are
    waited for), this process's CPU time (every thread, not sleep or waiting for a shared core)
    elsewhere. What ``work_s`` and ``budget.compute`` count; the benchmarks measure baselines with it."""
    if device.type == "cuda":
        def cuda_time() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return cuda_time
    return time.process_time


def reused_result(spec: SearchSpec, number: int, hparams: Mapping[str, Any], prior: StoredTrial) -> TrialResult:
    """Trial ``number`` sampled the configuration ``prior`` already ran: its outcome, reused (nothing
    runs; ``work_s`` 0, no model saved, never on the front twice, ``duplicate_of`` names ``prior``).
    The sampler is told the same values (or state) as for ``prior``."""
    rec = prior.record
    fields_ = ("val_acc", "macs", "macs_frac", "params", "params_frac", "latency_ms", "fidelity", "prune_s",
               "distill_epochs")
    measured = {k: rec.get(k) for k in fields_}
    acc = rec.get("val_acc")
    constraints: tuple[float, ...] = ()
    if acc is not None and rec.get("params_frac") is not None and rec.get("macs_frac") is not None:
        constraints = constraint_values(spec, float(acc), float(rec["params_frac"]), float(rec["macs_frac"]))
    log.info("trial %d: the configuration of trial %d again; its result is reused, nothing runs", number,
             prior.number)
    return TrialResult(number=number, state=prior.state, hparams=dict(hparams), epochs_run=0, duration_s=0.0,
                       constraints=constraints, curve=tuple(prior.curve), cost=prior.cost,
                       objectives=tuple(spec.objectives), phases=tuple(rec.get("phases") or ()),
                       stopped_at=str(rec.get("stopped_at") or ""), error=prior.error, work_s=0.0,
                       duplicate_of=prior.number, **measured)


def poll_stop() -> bool:
    """The training loops' per-step stop signal: a stop request (:mod:`.stop`: SIGTERM, a caller) ends
    the trial as Ctrl-C would, mid-epoch, instead of at the epoch's end."""
    stop.check()
    return False


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA), or the CPU
    allocator's "can't allocate memory" RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _message(exc: Exception, worker: Worker, hparams: Mapping[str, Any] | None = None) -> str:
    """The trial's error in one line; a non-finite loss and running out of memory say what to change."""
    if out_of_memory(exc):
        batch = int((hparams or {}).get("batch_size") or 128)
        return (f"out of memory at batch size {batch} on {worker.device}: lower space.batch_size in "
                f"{worker.spec.source} (e.g. {max(1, batch // 2)}), or the image size or --workers")
    if isinstance(exc, NonFiniteLoss):
        hint = f"lower space.lr in {worker.spec.source}"
        if worker.device.type == "cuda":
            hint += ", or set device: cpu to train without mixed precision"
        return f"{type(exc).__name__}: {nan_head(exc)}; {hint}"
    return one_line(exc)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run(worker: Worker, number: int, hparams: dict[str, Any], finished: Finished | None,
         early_stopping: bool, progress: _Progress, start: float, seed_index: int, screen: bool = True) -> TrialResult:
    from . import space  # the search-space module (owned by the spec layer)

    spec = worker.spec
    method, target, allocation, method_params, epochs, lr = space.to_prune_args(hparams, spec.allocation)
    epochs = int(epochs)
    impl = get_method(method)
    k = min(epochs, max(0, int(impl.training_epochs(make_params(impl, method_params), epochs))))
    phases = early_stop.schedule(epochs, k, method)
    progress.phases = phases
    cfg = TrainConfig(epochs=k, lr=float(lr), batch_size=int(hparams.get("batch_size", 128)),
                      seed=int(spec.seed) + seed_index, augment=spec.augment)
    epoch = _Epochs(worker, number, epochs, phases, progress,
                    early_stopping and spec.early_stop.enabled and finished is not None, finished)
    pruned = engine.prune(worker.model, method, target, data=worker.data, allocation=allocation,
                          spec=worker.model_spec, device=worker.device, train_cfg=cfg, groups=worker.groups,
                          on_epoch=epoch.end, objective=worker.latency if epoch.objective == "latency" else None,
                          should_stop=poll_stop, **method_params,
                          feedback=latency_objective.feedback(spec, worker) if epoch.objective == "latency" else None)
    model = pruned.model
    m = progress.measured
    m.update(macs=pruned.macs, macs_frac=pruned.macs / pruned.base_macs, params=pruned.params,
             params_frac=pruned.params / pruned.base_params)
    # the fidelity rung: the pruned (and BN-recalibrated) model before any fine-tuning costs one evaluation
    with phase("fidelity"):
        m["fidelity"] = float(evaluate(model, worker.data.val, worker.device)["acc"])
    m["prune_s"] = time.perf_counter() - start
    if epoch.objective == "latency":  # timed interleaved with the base, the other workers paused
        with phase("latency"):
            pruned_ms, base_ms = latency_objective.measure_trial(worker.out_dir, worker.model, model,
                                                                 worker.input_shape, worker.latency_cfg,
                                                                 worker.spec.workers > 1)
        m["latency_frac"] = pruned_ms / base_ms
        m["latency_ms"] = m["latency_frac"] * float(worker.base["latency_ms"])
        m["predicted_latency_frac"] = float(pruned.info["predicted_frac"])
    m["cost"] = epoch.cost = float(m[OBJECTIVE_COLUMNS[epoch.objective]])
    done = pruned.trained_epochs if pruned.stopped_early else k
    progress.curve = (progress.curve + [None] * done)[:done]
    progress.epochs_run = epoch.offset = done
    own = early_stop.round_key(method, target, allocation.mode)  # the screening round's key of this configuration
    if screen and not epoch.stopped and epochs > k and _screened_out(worker, number, epoch, phases, m, own):
        return _result(worker, number, hparams, "early_stopped", m["fidelity"], progress, start, stopped_at="screen")
    if not epoch.stopped and epochs > k:
        epoch.pause = latency_objective.PausePoint(worker.out_dir) if worker.spec.workers > 1 else None
        alpha, until = distillation(worker.teacher_acc, hparams, epoch.reference, number)
        ft_cfg = replace(cfg, epochs=epochs - k, distill_alpha=alpha, distill_until=until,
                         distill_temperature=float(hparams.get("distill_temperature") or 4.0))
        run = fit(model, worker.data.train, worker.data.val, ft_cfg, worker.device,
                  Callbacks(on_epoch_end=epoch.end, after_backward=epoch.pause, should_stop=poll_stop),
                  teacher=worker.model if alpha > 0 else None, progress="fine-tune")
        m["distill_epochs"] = sum(1 for h in run.history if h.get("distilled"))
    if epochs <= k or pruned.stopped_early:  # no fine-tune: the pruned model as the method returned it
        progress.curve = progress.curve or [None]
        progress.curve[-1] = m["fidelity"]
    val_acc = next(a for a in reversed(progress.curve) if a is not None)
    state = "early_stopped" if epoch.stopped else "complete"
    saved = ""
    if state == "complete":
        with phase("save"):
            saved = _save(worker, number, hparams, model, pruned, val_acc)
    result = _result(worker, number, hparams, state, val_acc, progress, start, model=saved,
                     stopped_at=f"epoch {progress.epochs_run}" if epoch.stopped else "")
    log.info("trial %d %s: %s target %.2f -> val_acc %.4f (fidelity %.4f), %d MACs (%.3f of base), %d epochs, "
             "%.1f s", number, state, method, target, val_acc, m["fidelity"], result.macs, result.macs_frac,
             result.epochs_run, result.duration_s)
    return result


class _Epochs:
    """The one epoch path of a trial: training-time epochs of the method (their reading is the model the
    method would return then, with its cost) and fine-tune epochs alike; decides early stopping."""

    def __init__(self, worker: Worker, number: int, epochs: int, phases: tuple[str, ...], progress: _Progress,
                 active: bool, finished: Finished | None) -> None:
        self.worker, self.number, self.epochs, self.phases = worker, number, epochs, phases
        self.progress, self.active, self.finished = progress, active, finished
        self.objective = worker.spec.objectives[1]
        self.offset = 0  # epochs before the running fit: a fine-tune's first epoch is epoch k + 1
        self.cost: float | None = None  # known after surgery; before it, the method's reading says
        self.stopped = False
        self.pause: Callable[..., None] | None = None  # latency objective, several workers: a pause point

    def reference(self) -> early_stop.Reference:
        ref = self.finished() if self.finished is not None else early_stop.Reference()
        if not isinstance(ref, early_stop.Reference):  # a plain list of complete trials
            ref = early_stop.Reference(tuple(ref))
        return ref

    def end(self, epoch: int, metrics: dict) -> bool:
        if self.pause is not None:
            self.pause()
        e = self.offset + epoch
        acc = metrics.get("val_acc")
        acc = None if acc is None or math.isnan(acc) else float(acc)
        self.progress.curve.append(acc)
        self.progress.epochs_run = e
        cost = self.cost if self.cost is not None else metrics.get(OBJECTIVE_COLUMNS[self.objective])
        if acc is None or cost is None or not self.active:  # latency: known after surgery only
            return False
        rule = self.worker.spec.early_stop
        if early_stop.should_stop(float(cost), e, acc, self.reference().peers, phases=self.phases, margin=rule.margin,
                                  n_val=len(self.worker.data.val), se_multiple=rule.se_multiple,
                                  min_epochs=rule.min_epochs, min_trials=rule.min_trials,
                                  cost_tolerance=rule.cost_tolerance):
            log.info("trial %d early-stopped at epoch %d/%d: val_acc %.4f behind cheaper finished trials",
                     self.number, e, self.epochs, acc)
            self.stopped = True
        return self.stopped


def _screened_out(worker: Worker, number: int, epoch: _Epochs, phases: tuple[str, ...], m: dict[str, Any],
                  config: str = "") -> bool:
    """The fidelity screen before fine-tuning: the pruned model is not in the best share of its bucket
    (never against the screening round's measurement of its own ``config``)."""
    screen = worker.spec.screen
    if epoch.finished is None or not screen.enabled:
        return False
    objective = epoch.objective
    frac = {"params": m["params_frac"], "latency": m.get("latency_frac")}.get(objective) or m["macs_frac"]
    if early_stop.screen_out(frac, m["fidelity"], epoch.reference().candidates, keep=screen.keep,
                             bucket=screen.bucket, min_peers=screen.min_peers,
                             phase=early_stop.screening_phase(phases), n_val=len(worker.data.val),
                             se_multiple=screen.se_multiple, config=config):
        log.info("trial %d screened out: fidelity %.4f not in the best %.0f %% of its %s-fraction bucket",
                 number, m["fidelity"], 100 * screen.keep, "params" if objective == "params" else
                 "latency" if objective == "latency" else "MACs")
        return True
    return False


def _result(worker: Worker, number: int, hparams: dict[str, Any], state: str, val_acc: float, progress: _Progress,
            start: float, model: str = "", stopped_at: str = "") -> TrialResult:
    m = progress.measured
    constraints = constraint_values(worker.spec, val_acc, m["params_frac"], m["macs_frac"])
    return TrialResult(number=number, state=state, hparams=hparams, val_acc=float(val_acc),
                       epochs_run=progress.epochs_run, duration_s=time.perf_counter() - start,
                       constraints=constraints, model=model, curve=tuple(progress.curve),
                       objectives=tuple(worker.spec.objectives), phases=progress.phases, stopped_at=stopped_at, **m)


def _save(worker: Worker, number: int, hparams: Mapping[str, Any], model: nn.Module, pruned: PruneResult,
          val_acc: float) -> str:
    rel = model_path(number)
    metrics = {"val_acc": float(val_acc), "macs": pruned.macs, "params": pruned.params,
               "base_macs": pruned.base_macs, "base_params": pruned.base_params,
               "base_val_acc": worker.base.get("val_acc")}
    save_pruned(worker.out_dir / rel, model, worker.model_spec, pruned.plan, data=worker.spec.data,
                metrics=metrics, extra={"trial": number, "params": _json_scalars(hparams)})
    write_json(worker.out_dir / plan_path(number), pruned.plan.to_dict())
    return rel


def _json_scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as saved in a checkpoint: JSON scalars kept, anything else as its string."""
    out = {}
    for k, v in d.items():
        out[str(k)] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return out


