"""The runs behind :mod:`.search_vs_tp`, each side measured in seconds of work.

Every side is a :class:`Side`: its points (method, target, val acc, MACs fraction, measured seconds,
epochs) and the fine-tuned models, kept for the test column. Seconds of work are read with the
search's own clock (:func:`autoprune.search.trial.work_clock`: process CPU time, or synchronised GPU
time), around everything a side does for a point: pruning (with Torch-Pruning's ratio bisection),
BN recalibration, evaluations and every training epoch.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..search.trial import work_clock
from ..train import evaluate
from . import common
from .quality import THEIRS, Bench, run_ours, run_theirs

log = logging.getLogger(__name__)

SINGLE = ("l1", "lrf", "fsm", "resrep")  # our methods run alone (global allocation, default parameters)
METHOD_SPACE = {"resrep": {"forget_by": {"low": 0.25, "high": 0.9}},
                "lrf": {"compensate": [True, False]}, "fsm": {"compensation": ["gaussian", "measured"]}}
DISTILL = (0.0, 0.5)  # distillation weights searched (the round's trials use the largest)
COST_TOL = 0.01  # relative: a complete trial this much more expensive still counts as "no more expensive"


@dataclass
class Side:
    """One side's points: rows with method, target, val_acc, macs_frac, work_s, epochs (+ test_acc)."""

    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    models: list[nn.Module | None] = field(default_factory=list)
    wall_s: float = 0.0
    extra_work_s: float = 0.0  # work not in any row (the search's screening round)

    @property
    def work_s(self) -> float:
        return self.extra_work_s + sum(float(r.get("work_s") or 0.0) for r in self.rows)

    @property
    def epochs(self) -> int:
        return sum(int(r.get("epochs") or 0) for r in self.rows)

    def points(self, key: str = "val_acc") -> np.ndarray:
        pts = [(r[key], r["macs_frac"]) for r in self.rows if r.get(key) is not None]
        return np.asarray(pts, dtype=float).reshape(-1, 2)


def _point(b: Bench, fn: Any, keep: list[nn.Module]) -> dict[str, Any]:
    clock = work_clock(b.device)
    start = clock()
    row = fn(keep)
    return {"method": row["method"], "target": row["target"], "val_acc": float(row["val acc after FT"]),
            "macs_frac": float(row["MACs frac"]), "work_s": clock() - start, "epochs": b.case.epochs}


def tp_sweep(b: Bench, labels: Sequence[str], targets: Sequence[float], seed: int) -> dict[str, Side]:
    """Every Torch-Pruning criterion at every target (pruned, recalibrated, fine-tuned), one Side each."""
    cache: dict = {}
    sides = {}
    for label in labels:
        side = Side(label)
        t0 = time.perf_counter()
        for target in targets:
            common.seed_all(seed)
            keep: list[nn.Module] = []
            try:
                side.rows.append(_point(b, lambda k, la=label, t=target: run_theirs(b, la, *THEIRS[la], t, seed, cache,
                                                                                   k), keep))
                side.models.append(keep[-1])
            except Exception as exc:  # noqa: BLE001 - a failed point is reported, the sweep goes on
                log.error("%s @ %.2f failed: %s", label, target, exc)
        side.wall_s = time.perf_counter() - t0
        sides[label] = side
    return sides


def single_methods(b: Bench, targets: Sequence[float], seed: int, methods: Sequence[str] = SINGLE) -> dict[str, Side]:
    """Each of our methods alone at the targets (global allocation, default parameters)."""
    sides = {}
    for m in methods:
        side = Side(f"autoprune {m}")
        t0 = time.perf_counter()
        for target in targets:
            common.seed_all(seed)
            keep: list[nn.Module] = []
            try:
                side.rows.append(_point(b, lambda k, t=target, mm=m: run_ours(b, f"autoprune {mm}", mm, "global", {},
                                                                              t, seed, k), keep))
                side.models.append(keep[-1])
            except Exception as exc:  # noqa: BLE001
                log.error("%s @ %.2f failed: %s", m, target, exc)
        side.wall_s = time.perf_counter() - t0
        sides[side.label] = side
    return sides


def search_spec(b: Bench, base: Path, study: str, targets: Sequence[float], seed: int, *, compute_s: float | None,
                max_trials: int | None = None, early_stop: bool = True, screen: bool = True,
                target_step: float | None = None, distill: Sequence[float] = DISTILL,
                sensitivity: bool = False) -> dict[str, Any]:
    """The search: TPE over method, target (the sweep's targets; with ``target_step`` a grid over the
    swept range), distillation from the base (``distill`` weights; off when ``(0,)``), allocation with the
    per-layer shape, method parameters; screening (with the round) and early stopping at the defaults
    of the margin (one standard error); budget in measured seconds (``compute_s``) or trials."""
    residual = 0 if b.case.model == "small_cnn" else {"low": -1, "high": 1}
    target: Any = sorted(targets, reverse=True)  # the sweep's targets: every side is scored at the same ones
    if target_step:
        target = {"low": min(targets), "high": max(targets), "step": target_step}
    budget: dict[str, Any] = {"max_trials": max_trials}
    if compute_s is not None:
        budget["compute"] = float(compute_s)
    return {
        "study": study, "model": b.case.model, "data": b.case.data.to_dict(), "base": str(base), "device": "cpu",
        "seed": seed, "sampler": "tpe", "budget": budget,
        "early_stop": {"enabled": early_stop, "min_epochs": 1, "min_trials": 1},
        "screen": {"enabled": screen, "keep": 0.3, "bucket": 0.1, "min_peers": 1, "round": screen,
                   "sensitivity": sensitivity},
        "allocation": {"min_ratio": 0.05, "round_to": 1},
        "space": {"method": list(SINGLE), "target": target,
                  "allocation": ["uniform", "global", "searched"], "buckets": 3, "log_ratio": {"low": -1, "high": 1},
                  "residual": residual, "distill": list(distill) if len(distill) > 1 else float(distill[0]),
                  "epochs": b.case.epochs, "lr": b.case.lr, "batch_size": b.case.batch_size,
                  "methods": METHOD_SPACE},
    }


def run_search_side(b: Bench, work: Path, name: str, spec: dict[str, Any], budget_s: float | None
                    ) -> tuple[Side, list[dict[str, Any]], Any]:
    """Run the search; its Side holds the trials that fit in ``budget_s`` measured seconds (in trial
    order after the screening round's work; the one that crosses the budget is dropped). Returns
    (side, every counted trials.csv row, the study's store)."""
    import yaml

    from ..engine.plan import load_pruned
    from ..search.runner import open_store, run_search
    from ..search.spec import load_spec

    t0 = time.perf_counter()
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_search(load_spec(path), out_dir=work / name, progress=False, data=b.data)
    store = open_store(load_spec(path), work / name, "optuna")
    side = Side(name, wall_s=time.perf_counter() - t0)
    side.extra_work_s = float(store.meta().get("round_work_s") or 0.0)
    rows = sorted(result.rows, key=lambda r: int(r["number"]))
    counted, total = [], side.extra_work_s
    for r in rows:
        total += float(r.get("work_s") or 0.0)
        if budget_s is not None and total > budget_s:
            break
        counted.append(r)
    for r in counted:
        ok = r["state"] == "complete" and str(r.get("feasible")) == "True" and not r.get("duplicate_of")
        side.rows.append({"method": r["method"], "target": float(r["target"]), "number": int(r["number"]),
                          "val_acc": float(r["val_acc"]) if ok else None, "macs_frac": float(r["macs_frac"] or "nan"),
                          "work_s": float(r.get("work_s") or 0.0), "epochs": int(r.get("epochs_run") or 0)})
        model = None
        if ok and r.get("model"):
            model, _ = load_pruned(work / name / r["model"], b.device)
        side.models.append(model)
    return side, counted, store


def reference_before(store: Any, number: int) -> Any:
    """The complete trials numbered below ``number`` (a copy of an earlier result counted once) as the
    :class:`~autoprune.search.early_stop.Reference` a re-run reads: what the trial saw when it ran (one
    worker finishes trials in order), so its distillation follows the same rule (a finished trial that
    reached the teacher turns it off). No screening candidates: a re-run is never screened out."""
    from ..search.early_stop import Reference
    from ..search.store import finished_curves

    return Reference(finished_curves(store, before=number).peers)


def stopped_to_rerun(counted: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The early-stopped trials to re-run, epoch stops first, then screened-out ones; a reused result
    (``duplicate_of``) is its original trial's, so it is not re-run again."""
    own = [r for r in counted if not r.get("duplicate_of") and r["state"] == "early_stopped"]
    return ([r for r in own if str(r.get("stopped_at", "")).startswith("epoch")]
            + [r for r in own if r.get("stopped_at") == "screen"])


def rerun_stopped(b: Bench, work: Path, name: str, counted: Sequence[Mapping[str, Any]], store: Any,
                  limit: int) -> list[dict[str, Any]]:
    """Re-run up to ``limit`` early-stopped trials (epoch stops first, then screened-out ones) to the end,
    same configuration, training seed and distillation rule (against the trials finished before it), and
    compare each with the best complete trial at no more cost (what it was judged against). Rows: number,
    method, target, stopped_at, reading, final, reference, ahead (strictly), ahead beyond 2 SE."""
    from ..search.early_stop import accuracy_se
    from ..search.spec import load_spec
    from ..search.trial import Worker, run_trial

    stopped = stopped_to_rerun(counted)
    if not stopped or limit <= 0:
        return []
    spec = load_spec(work / f"{name}.yaml")
    worker = Worker.load(spec, work / name, b.device, data=b.data)
    hparams = {t.number: t.hparams for t in store.trials()}
    complete = [r for r in counted if r["state"] == "complete" and not r.get("duplicate_of")]
    out = []
    for r in stopped[:limit]:
        n = int(r["number"])
        res = run_trial(worker, 100000 + n, hparams[n], lambda n=n: reference_before(store, n), early_stopping=False,
                        seed_index=n)
        cost = float(r["macs"] or math.inf)
        ref = max((float(c["val_acc"]) for c in complete if float(c["macs"]) <= cost * (1 + COST_TOL)), default=None)
        final = res.val_acc if res.state == "complete" else None
        se = accuracy_se(ref if ref is not None else 0.5, len(b.data.val))
        out.append({"trial": n, "method": r["method"], "target": float(r["target"]), "stopped at": r["stopped_at"],
                    "reading when stopped": float(r["val_acc"]) if r.get("val_acc") not in (None, "") else None,
                    "final (re-run)": final, "best complete at <= its MACs": ref,
                    "ahead": final is not None and ref is not None and final > ref,
                    "ahead beyond 2 SE": final is not None and ref is not None and final - ref > 2 * 2 ** 0.5 * se})
        log.info("re-ran early-stopped trial %d (%s): final %s vs %s", n, r["method"], final, ref)
    return out


@torch.no_grad()
def add_test_column(b: Bench, side: Side) -> None:
    """Test accuracy of the side's val-front points (chosen on validation; the test split is read
    here only, never to choose)."""
    from ..report.pareto import pareto_mask

    pts = side.points()
    keep = np.asarray(pareto_mask(pts, [True, False])) if len(pts) else np.zeros(0, dtype=bool)
    rows = [r for r in side.rows if r.get("val_acc") is not None]
    models = [m for r, m in zip(side.rows, side.models) if r.get("val_acc") is not None]
    for r, m, on in zip(rows, models, keep):
        r["on_val_front"] = bool(on)
        if on and m is not None:
            r["test_acc"] = float(evaluate(m, b.data.test, b.device)["acc"])
