"""What a trial's outcome is and how it is written down, shared by every backend and free of torch.

:class:`TrialResult` (one trial's outcome), the constraint values Optuna stores with it, and the
``trials.csv`` row format, writer and reader (:func:`read_rows`; the report reads it as a table with
:func:`autoprune.report.tables.read_table`). :mod:`autoprune.search.trial` produces results,
:mod:`autoprune.search.store` keeps them, this module says what they mean on disk.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import atomic_path
from ..report.pareto import NOT_STARTED, TRIALS_CSV, not_started  # noqa: F401 - re-exported for the search layer

if TYPE_CHECKING:
    from .spec import SearchSpec

STATES = ("complete", "early_stopped", "failed", "interrupted", "running")  # interrupted: stopped, run again
HEAD_COLUMNS = ("number", "state", "method", "target", "allocation", "epochs", "lr")
TAIL_COLUMNS = ("val_acc", "macs", "macs_frac", "params", "params_frac", "latency_ms", "epochs_run",
                "duration_s", "feasible", "error", "model", "fidelity", "prune_s", "stopped_at", "latency_frac",
                "predicted_latency_frac", "work_s", "duplicate_of", "distill_epochs")
# fidelity: val acc right after surgery + BN recalibration (before fine-tuning; ResRep: after its
# compactor epochs); prune_s: seconds to prune, recalibrate and measure it; stopped_at: "" (ran every
# epoch), "screen" (not fine-tuned: screened out at the fidelity rung), "epoch N" (early-stopped) or
# "budget" (not started: its predicted work exceeded budget.compute's remainder; search/admission.py);
# work_s: measured seconds of the trial's work (this process's CPU time, or CUDA-synchronised wall time
# on a GPU: pruning, recalibration, fidelity, every training epoch, evaluations); duplicate_of: the
# earlier trial of the same configuration whose result this one reuses (nothing was run; work_s 0);
# distill_epochs: fine-tune epochs trained with the base model as teacher (distillation stops once the
# student reaches the teacher's val acc; blank when no fine-tune finished: none ran, or the trial failed in it)
INTERRUPTED = "interrupted: the process running this trial stopped before it finished"


def model_path(number: int) -> str:
    return f"models/trial_{number:04d}.pt"


def plan_path(number: int) -> str:
    return f"plans/trial_{number:04d}.json"


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
    latency_ms: float | None = None  # objective latency: latency_frac x the base's ms measured at worker start
    latency_frac: float | None = None  # measured, interleaved with the base (a pair)
    predicted_latency_frac: float | None = None  # the latency model's prediction the allocation aimed at
    epochs_run: int = 0
    duration_s: float = 0.0
    constraints: tuple[float, ...] = ()  # Optuna convention: feasible when every value <= 0
    error: str = ""
    model: str = ""  # relative path of the saved model ("" unless complete)
    curve: tuple[float | None, ...] = ()  # val acc per trial epoch (None where not measured)
    cost: float | None = None  # the second objective's value, known right after surgery
    objectives: tuple[str, str] = ("val_acc", "macs")
    fidelity: float | None = None  # val acc right after surgery + BN recalibration, before fine-tuning
    prune_s: float | None = None  # seconds of pruning (ResRep: its training included) + recalibration + fidelity
    phases: tuple[str, ...] = ()  # the phase of each epoch (early_stop.schedule): what a curve entry means
    stopped_at: str = ""  # "" | "screen" | "epoch N" | "budget" (not started: admission.py)
    work_s: float | None = None  # measured seconds of work (CPU time, or synchronised GPU wall time)
    duplicate_of: int | None = None  # the earlier trial of the same configuration this one reuses
    distill_epochs: int | None = None  # fine-tune epochs with the teacher (None: no fine-tune ran)

    @property
    def feasible(self) -> bool:
        """Complete and meets every constraint (an early-stopped or failed trial never is)."""
        return self.state == "complete" and self.duplicate_of is None and all(c <= 0 for c in self.constraints)

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
                "latency_frac": self.latency_frac, "predicted_latency_frac": self.predicted_latency_frac,
                "epochs_run": self.epochs_run, "duration_s": round(self.duration_s, 3),
                "feasible": self.feasible, "error": self.error, "model": self.model,
                "fidelity": self.fidelity, "prune_s": None if self.prune_s is None else round(self.prune_s, 3),
                "stopped_at": self.stopped_at, "phases": list(self.phases), "objective": self.objectives[1],
                "work_s": None if self.work_s is None else round(self.work_s, 3), "duplicate_of": self.duplicate_of,
                "distill_epochs": self.distill_epochs}


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters (out-of-memory errors say so first)."""
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        text = "out of memory: " + text
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


def nan_head(exc: BaseException) -> str:
    """What a non-finite-loss error says happened, without the training loop's generic advice (which
    names options of ``autoprune train``): the caller adds what the user can change from where they are."""
    return " ".join(str(exc).split("; lower the learning rate")[0].split())


def constraint_values(spec: SearchSpec, val_acc: float, params_frac: float, macs_frac: float) -> tuple[float, ...]:
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


def constraint_names(spec: SearchSpec) -> tuple[str, ...]:
    """Names of the constraints :func:`constraint_values` returns, in the same order."""
    keys = ("min_val_acc", "max_params_frac", "max_macs_frac")
    return tuple(k for k in keys if getattr(spec, k) is not None)


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
    row["feasible"] = bool(record.get("feasible", False)) and state == "complete"  # complete and within constraints
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
    cols = columns(rows)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["number"]):
            writer.writerow({k: _cell(row.get(k)) for k in cols})
    return path


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV table the search wrote (``trials.csv``, ``pareto.csv``) as strings; [] when the
    file does not exist (OSError, csv.Error or UnicodeDecodeError when it cannot be read)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def count_rows(path: str | Path) -> int:
    """Data rows of ``path`` (0 when missing or unreadable)."""
    try:
        return len(read_rows(path))
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0
