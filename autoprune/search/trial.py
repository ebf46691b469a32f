"""One search trial, shared by every backend: prune -> fine-tune -> evaluate -> record -> save.

A :class:`Worker` holds what a worker process loads once (data on its device, the base model, its
channel groups); :func:`run_trial` runs one sampled configuration on it and returns a
:class:`TrialResult` whether the trial completes, is early-stopped or fails. Backends only decide
which configuration to run next and where to store the result; the trial itself, the early-stopping
rule, the constraints, the saved files and the ``trials.csv`` row format live here.

Training budget: a trial has ``epochs`` = E epochs in all; a training-time method (ResRep) gets
``k = method.training_epochs(params, E)`` of them while pruning, the model is fine-tuned E - k
epochs after surgery. Epochs in curves and in the early-stopping rule count from the start of the
trial, so a ResRep trial's first fine-tune epoch is epoch k + 1. During its k epochs ResRep reports
the accuracy of the model it would return at that point (its current mask applied; None until the
mask meets the target), so early stopping can stop it there too. The test split is never touched.
"""
from __future__ import annotations

import csv
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import engine
from ..cost import measure_latency
from ..data import Dataset, load_data
from ..graph import ChannelGroup, find_groups
from ..methods import EpochReport, PruneStopped, get_method, make_params
from ..models import ModelSpec
from ..plan import load_base, save_pruned
from ..train import Callbacks, TrainConfig, evaluate, fit
from . import early_stop

log = logging.getLogger(__name__)

STATES = ("complete", "early_stopped", "failed", "running")
HEAD_COLUMNS = ("number", "state", "method", "target", "allocation", "epochs", "lr")
TAIL_COLUMNS = ("val_acc", "macs", "macs_frac", "params", "params_frac", "latency_ms", "epochs_run",
                "duration_s", "feasible", "error", "model")
COST_KEYS = {"macs": "macs", "params": "params", "latency": "latency_ms"}
INTERRUPTED = "interrupted: the process running this trial stopped before it finished"

Finished = Callable[[], Sequence[tuple[float, Sequence["float | None"]]]]


def model_path(number: int) -> str:
    return f"models/trial_{number:04d}.pt"


def plan_path(number: int) -> str:
    return f"plans/trial_{number:04d}.json"


@dataclass
class Worker:
    """Per-process state, loaded once: data on the device, base model, channel groups, base metrics."""

    spec: Any  # autoprune.search.spec.SearchSpec
    out_dir: Path
    device: torch.device
    data: Dataset
    model: nn.Module
    model_spec: ModelSpec
    groups: list[ChannelGroup]
    base: dict[str, Any]  # val_acc, macs, params (+ latency_ms when latency is an objective)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = self.model_spec
        return (s.in_channels, s.image_size, s.image_size)

    @classmethod
    def load(cls, spec: Any, out_dir: str | Path, device: torch.device,
             data: Dataset | None = None) -> Worker:
        out_dir = Path(out_dir)
        model, ckpt = load_base(out_dir / "base.pt", device)
        model_spec = ModelSpec.from_dict(ckpt["model"])
        if data is None:
            data = load_data(spec.data, device)
        shape = (model_spec.in_channels, model_spec.image_size, model_spec.image_size)
        groups = find_groups(model, shape)
        base = dict(ckpt.get("metrics") or {})
        if "latency" in spec.objectives:  # device-specific: measured by each worker on its own device
            base["latency_ms"] = measure_latency(model, shape, 1, device)
        log.info("worker ready on %s: %s, %d prunable channel groups, base val_acc %.4f, %d MACs", device,
                 model_spec.name, sum(g.prunable for g in groups), base.get("val_acc", math.nan),
                 base.get("macs", 0))
        return cls(spec=spec, out_dir=out_dir, device=device, data=data, model=model, model_spec=model_spec,
                   groups=groups, base=base)


@dataclass(frozen=True)
class TrialResult:
    number: int
    state: str  # complete | early_stopped | failed
    hparams: Mapping[str, Any]  # the flat sampled/fixed configuration (space.suggest)
    val_acc: float | None = None
    macs: int | None = None
    macs_frac: float | None = None
    params: int | None = None
    params_frac: float | None = None
    latency_ms: float | None = None
    epochs_run: int = 0
    duration_s: float = 0.0
    constraints: tuple[float, ...] = ()  # Optuna convention: feasible when every value <= 0
    error: str = ""
    model: str = ""  # relative path of the saved model ("" unless complete)
    curve: tuple[float | None, ...] = ()  # val acc per trial epoch (None where not measured)
    cost: float | None = None  # the second objective's value, known right after surgery
    objectives: tuple[str, str] = ("val_acc", "macs")

    @property
    def feasible(self) -> bool:
        return self.state in ("complete", "early_stopped") and all(c <= 0 for c in self.constraints)

    @property
    def values(self) -> tuple[float, float] | None:
        """Objective values (accuracy first) for a complete trial, else None."""
        if self.state != "complete":
            return None
        return (float(self.val_acc), float(self.cost))  # type: ignore[arg-type]

    def record(self) -> dict[str, Any]:
        """JSON-serialisable summary, stored with the trial by the backend; :func:`make_row` reads it."""
        return {"state": self.state, "val_acc": self.val_acc, "macs": self.macs, "macs_frac": self.macs_frac,
                "params": self.params, "params_frac": self.params_frac, "latency_ms": self.latency_ms,
                "epochs_run": self.epochs_run, "duration_s": round(self.duration_s, 3),
                "feasible": self.feasible, "error": self.error, "model": self.model}


@dataclass
class _Progress:
    """What a trial has measured so far (kept when it fails half-way)."""

    curve: list[float | None] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0


def run_trial(worker: Worker, number: int, hparams: Mapping[str, Any], finished: Finished | None = None,
              early_stopping: bool = True, seed_index: int | None = None) -> TrialResult:
    """Run one configuration; never raises for a trial-level problem (it becomes state ``failed``).

    Training is seeded with ``spec.seed + seed_index`` (default: the trial number); the Optuna
    backend passes the trial's slot, so a retried trial trains as the one it replaces.

    ``finished()`` returns ``(cost, curve)`` of the completed trials so far (read at every epoch,
    so trials finishing in other workers count at once). KeyboardInterrupt propagates.
    """
    start = time.perf_counter()
    progress = _Progress()
    try:
        result = _run(worker, number, dict(hparams), finished, early_stopping, progress, start,
                      number if seed_index is None else seed_index)
    except Exception as exc:
        message = one_line(exc)
        log.warning("trial %d failed: %s", number, message)
        log.debug("trial %d traceback", number, exc_info=True)
        del exc
        result = TrialResult(number=number, state="failed", hparams=dict(hparams), error=message,
                             epochs_run=progress.epochs_run, duration_s=time.perf_counter() - start,
                             curve=tuple(progress.curve), objectives=tuple(worker.spec.objectives),
                             **progress.measured)
        _free_memory(worker.device)
    return result


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        text = "out of memory: " + text
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run(worker: Worker, number: int, hparams: dict[str, Any], finished: Finished | None,
         early_stopping: bool, progress: _Progress, start: float, seed_index: int) -> TrialResult:
    from . import space  # the search-space module (owned by the spec layer)

    spec = worker.spec
    method, target, allocation, method_params, epochs, lr = space.to_prune_args(hparams, spec.allocation)
    epochs = int(epochs)
    impl = get_method(method)
    k = min(epochs, max(0, int(impl.training_epochs(make_params(impl, method_params), epochs))))
    cfg = TrainConfig(epochs=k, lr=float(lr), batch_size=int(hparams.get("batch_size", 128)),
                      seed=int(spec.seed) + seed_index)
    objective = spec.objectives[1]
    rule = spec.early_stop
    active = early_stopping and rule.enabled and finished is not None
    stopped = False

    def behind(cost: float, e: int, acc: float) -> bool:
        nonlocal stopped
        if active and early_stop.should_stop(cost, e, acc, finished(), margin=rule.margin,
                                             min_epochs=rule.min_epochs, min_trials=rule.min_trials,
                                             total_epochs=epochs):
            log.info("trial %d early-stopped at epoch %d/%d: val_acc %.4f behind cheaper finished trials",
                     number, e, epochs, acc)
            stopped = True
        return stopped

    def on_prune_epoch(rep: EpochReport) -> bool:  # a training-time method's epochs (ResRep)
        progress.curve.append(rep.val_acc)
        progress.epochs_run = rep.epoch
        cost = {"macs": rep.macs, "params": rep.params}.get(objective)  # latency: known after surgery only
        return rep.val_acc is not None and cost is not None and behind(float(cost), rep.epoch, rep.val_acc)

    try:
        pruned = engine.prune(worker.model, method, target, data=worker.data, allocation=allocation,
                              spec=worker.model_spec, device=worker.device, train_cfg=cfg, groups=worker.groups,
                              on_epoch=on_prune_epoch, **method_params)
    except PruneStopped as exc:
        return _stopped_while_pruning(worker, number, hparams, exc.report, progress, start)
    model = pruned.model
    m = progress.measured
    m.update(macs=pruned.macs, macs_frac=pruned.macs / pruned.base_macs, params=pruned.params,
             params_frac=pruned.params / pruned.base_params)
    if objective == "latency":
        m["latency_ms"] = measure_latency(model, worker.input_shape, 1, worker.device)
    cost = float(m[COST_KEYS[objective]])
    m["cost"] = cost
    progress.curve = (progress.curve + [None] * k)[:k]
    progress.epochs_run = k

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        e = k + epoch
        acc = float(metrics["val_acc"])
        progress.curve.append(acc)
        progress.epochs_run = e
        return behind(cost, e, acc)

    if epochs > k:
        fit(model, worker.data.train, worker.data.val, replace(cfg, epochs=epochs - k), worker.device,
            Callbacks(on_epoch_end=on_epoch_end))
        val_acc = next(a for a in reversed(progress.curve) if a is not None)
    else:  # nothing left to fine-tune: evaluate the pruned model as it is
        val_acc = evaluate(model, worker.data.val, worker.device)["acc"]
        if progress.curve:
            progress.curve[-1] = val_acc
        else:
            progress.curve.append(val_acc)
    state = "early_stopped" if stopped else "complete"
    constraints = constraint_values(spec, val_acc, m["params_frac"], m["macs_frac"])
    saved = ""
    if state == "complete":
        saved = _save(worker, number, hparams, model, pruned, val_acc)
    result = TrialResult(number=number, state=state, hparams=hparams, val_acc=float(val_acc),
                         epochs_run=progress.epochs_run, duration_s=time.perf_counter() - start,
                         constraints=constraints, model=saved, curve=tuple(progress.curve),
                         objectives=tuple(spec.objectives), **m)
    log.info("trial %d %s: %s target %.2f -> val_acc %.4f, %d MACs (%.3f of base), %d epochs, %.1f s", number,
             state, method, target, val_acc, result.macs, result.macs_frac, result.epochs_run, result.duration_s)
    return result


def _stopped_while_pruning(worker: Worker, number: int, hparams: dict[str, Any], rep: EpochReport,
                           progress: _Progress, start: float) -> TrialResult:
    """The result of a trial early-stopped during a training-time method's epochs: the masked model's
    accuracy and cost at that epoch (nothing is saved)."""
    spec = worker.spec
    m: dict[str, Any] = {"macs": rep.macs, "macs_frac": rep.macs / rep.base_macs, "params": rep.params,
                         "params_frac": rep.params / rep.base_params}
    m["cost"] = float(m[COST_KEYS[spec.objectives[1]]])
    acc = float(rep.val_acc) if rep.val_acc is not None else math.nan
    result = TrialResult(number=number, state="early_stopped", hparams=hparams, val_acc=acc,
                         epochs_run=rep.epoch, duration_s=time.perf_counter() - start,
                         constraints=constraint_values(spec, acc, m["params_frac"], m["macs_frac"]),
                         curve=tuple(progress.curve), objectives=tuple(spec.objectives), **m)
    log.info("trial %d early_stopped while pruning: val_acc %.4f, %d MACs (%.3f of base), %d epochs, %.1f s",
             number, acc, result.macs, result.macs_frac, result.epochs_run, result.duration_s)
    return result


def constraint_values(spec: Any, val_acc: float, params_frac: float, macs_frac: float) -> tuple[float, ...]:
    """Optuna-style constraint values (<= 0 means satisfied), in the order min_val_acc,
    max_params_frac, max_macs_frac, for those the spec sets."""
    out = []
    if spec.min_val_acc is not None:
        out.append(float(spec.min_val_acc) - float(val_acc))
    if spec.max_params_frac is not None:
        out.append(float(params_frac) - float(spec.max_params_frac))
    if spec.max_macs_frac is not None:
        out.append(float(macs_frac) - float(spec.max_macs_frac))
    return tuple(out)


def constraint_names(spec: Any) -> tuple[str, ...]:
    """Names of the constraints :func:`constraint_values` returns, in the same order."""
    keys = ("min_val_acc", "max_params_frac", "max_macs_frac")
    return tuple(k for k in keys if getattr(spec, k) is not None)


def _save(worker: Worker, number: int, hparams: Mapping[str, Any], model: nn.Module, pruned: Any,
          val_acc: float) -> str:
    rel = model_path(number)
    metrics = {"val_acc": float(val_acc), "macs": pruned.macs, "params": pruned.params,
               "base_macs": pruned.base_macs, "base_params": pruned.base_params,
               "base_val_acc": worker.base.get("val_acc")}
    save_pruned(worker.out_dir / rel, model, worker.model_spec, pruned.plan, data=worker.spec.data,
                metrics=metrics, extra={"trial": number, "params": _plain(hparams)})
    plan_file = worker.out_dir / plan_path(number)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(pruned.plan.to_dict(), indent=1))
    os.replace(tmp, plan_file)
    return rel


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out[str(k)] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return out


# ------------------------------------------------------------------------------------------ rows


def make_row(number: int, state: str, hparams: Mapping[str, Any], record: Mapping[str, Any] | None = None,
             error: str = "") -> dict[str, Any]:
    """One ``trials.csv`` row (a dict keyed by column; parameters as ``param_<name>``)."""
    record = dict(record or {})
    row: dict[str, Any] = {"number": number, "state": state}
    for key in HEAD_COLUMNS[2:]:
        row[key] = hparams.get(key)
    for key, value in hparams.items():
        if key not in HEAD_COLUMNS:
            row[f"param_{key}"] = value
    for key in TAIL_COLUMNS:
        row[key] = record.get(key)
    row["feasible"] = bool(record.get("feasible", False)) and state in ("complete", "early_stopped")
    row["error"] = error or record.get("error") or ""
    row["model"] = record.get("model") or ""
    if row.get("epochs_run") is None:
        row["epochs_run"] = 0
    return row


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    params = sorted({k for r in rows for k in r if k.startswith("param_")})
    return [*HEAD_COLUMNS, *params, *TAIL_COLUMNS]


def write_trials_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (sorted by number) atomically: a killed search never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = columns(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["number"]):
            writer.writerow({k: _cell(row.get(k)) for k in cols})
    os.replace(tmp, path)
    return path


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value
