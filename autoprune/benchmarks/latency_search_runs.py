"""Part 3 of :mod:`.latency_search`: a search for accuracy vs latency against one for accuracy vs MACs.

Fashion-MNIST ResNet-20 with the quality benchmark's base, fine-tune subset and recipe
(:func:`autoprune.benchmarks.quality.prepare`). Both searches get the same space, sampler, seed and
number of trials; only the objective differs. Afterwards every complete model of both is timed at
batch 1 against the base in one run, a pair each (so both fronts are measured alike), and the fronts
are compared in (val acc, measured latency fraction): hypervolume, and for each point of the MACs
front the speed-up of the fastest latency-front model at no less accuracy minus one standard error.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.allocate import AllocationConfig, floor_widths
from ..engine.graph import find_groups
from ..engine.latency import build_latency_model, measure_models
from ..engine.latency_table import LatencyConfig
from ..engine.plan import load_pruned, save_base
from ..report.pareto import acc_cost_hypervolume, pareto_mask
from ..search.early_stop import accuracy_se
from . import common
from .quality import prepare

log = logging.getLogger(__name__)

MIN_RATIO = 0.05


def clock_for(args: Any, threads: int) -> str:
    """``--clock auto``: the thread's CPU time for one thread (robust to other work on a shared machine), wall
    clock for more (CPU time would add the threads up)."""
    return ("cpu" if threads == 1 else "wall") if args.clock == "auto" else args.clock


def _spec(b: Any, base: Path, objective: str, low: float, args: Any, threads: int) -> dict[str, Any]:
    return {
        "study": f"{b.case.model}_{objective}", "model": b.case.model, "data": b.case.data.to_dict(), "base": str(base),
        "device": "cpu", "seed": args.seed, "sampler": "tpe", "objectives": ["val_acc", objective],
        "latency": {"batch_size": 1, "runtime": "torch", "threads": threads, "rounds": args.rounds,
                    "points": args.points, "clock": clock_for(args, threads)},
        "budget": {"max_trials": args.trials},
        "allocation": {"min_ratio": MIN_RATIO, **({"round_to": args.round_to} if objective == "latency" else {})},
        "space": {"method": "l1", "target": {"low": round(low, 2), "high": 0.9},
                  "allocation": ["uniform", "global", "searched"], "buckets": 3, "log_ratio": {"low": -1, "high": 1},
                  "residual": {"low": -1, "high": 1}, "epochs": b.case.epochs, "lr": b.case.lr,
                  "batch_size": b.case.batch_size},
    }


def _search(b: Any, work: Path, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    import yaml

    from ..search.runner import run_search
    from ..search.spec import load_spec

    path = work / f"{spec['study']}.yaml"
    path.write_text(yaml.safe_dump(dict(spec), sort_keys=False))
    result = run_search(load_spec(path), out_dir=work / spec["study"], progress=False, data=b.data)
    return [dict(r) for r in result.rows if r["state"] == "complete" and r.get("model")]


def _fronts(points: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: p[np.asarray(pareto_mask(p, [True, False]))] if len(p) else p for k, p in points.items()}


def speedups(lat_pts: np.ndarray, macs_front: np.ndarray, n_val: int) -> list[float]:
    """For each MACs-front point: its latency over that of the fastest latency-search model whose
    accuracy is at least the point's minus one standard error (none: skipped)."""
    out = []
    for acc, frac in macs_front:
        ok = lat_pts[lat_pts[:, 0] >= acc - accuracy_se(acc, n_val)] if len(lat_pts) else lat_pts
        if len(ok):
            out.append(float(frac / ok[:, 1].min()))
    return out


def write_points(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Every complete model of both searches, one row each (the data behind the plot)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows), columns=["search", "trial", "val acc", "MACs frac", "latency frac (in its search)",
                                      "latency frac (re-measured)"]).to_csv(path, index=False, float_format="%.6g")


def plot(path: Path, points: Mapping[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, pts), (color, style) in zip(points.items(), (("tab:blue", "o-"), ("tab:red", "s--"))):
        if not len(pts):
            continue
        ax.scatter(pts[:, 1], pts[:, 0], color=color, alpha=0.25, s=14)
        front = pts[np.asarray(pareto_mask(pts, [True, False]))]
        front = front[np.argsort(front[:, 1])]
        ax.step(front[:, 1], front[:, 0], style, where="post", color=color, label=label, markersize=5)
    common.save_front_plot(fig, ax, path, "measured latency, batch 1 (fraction of the base)", title)


def run_search_part(args: Any) -> tuple[common.Table, list[str]]:
    """Run both searches, re-measure their models; (table, preamble lines)."""
    threads = (args.thread_counts or [1])[0]
    b = prepare(args.search_case, torch.device("cpu"), args.ft_subset if args.ft_subset is not None else -1,
                base_path=args.search_base)
    shape = b.shape
    before = os.environ.get("AUTOPRUNE_CACHE")
    os.environ["AUTOPRUNE_CACHE"] = args.cache_dir  # the search workers' latency model: fresh, this run's
    try:
        with tempfile.TemporaryDirectory(prefix="autoprune_latency_search_") as tmp:
            work = Path(tmp)
            base = work / "base.pt"
            save_base(base, b.model, b.spec, b.case.data, {k: b.base[k] for k in ("val_acc", "macs", "params")})
            cfg = LatencyConfig(batch_size=1, threads=threads, rounds=args.rounds, points=args.points,
                                clock=clock_for(args, threads))
            groups = find_groups(b.model, shape)
            lm = build_latency_model(b.model, groups, shape, cfg)
            # the fastest the latency search's allocation can reach (its min ratio and round_to)
            acfg = AllocationConfig(min_ratio=MIN_RATIO, round_to=args.round_to)
            floor = lm.value(floor_widths(groups, acfg, lm)) / lm.base
            rows = {obj: _search(b, work, _spec(b, base, obj, max(0.3, floor + 0.05) if obj == "latency" else 0.3,
                                                args, threads))
                    for obj in ("latency", "macs")}
            models = [load_pruned(work / f"{b.case.model}_{obj}" / r["model"], "cpu")[0] for obj in rows for r in rows[obj]]
            ms = measure_models([b.model, *models], shape, cfg, "re-measure both fronts")
    finally:
        if before is None:
            os.environ.pop("AUTOPRUNE_CACHE", None)
        else:
            os.environ["AUTOPRUNE_CACHE"] = before
    return _compare(args, b, rows, ms, floor, threads)


def _compare(args: Any, b: Any, rows: Mapping[str, list[dict[str, Any]]], ms: Sequence[float], floor: float,
             threads: int) -> tuple[common.Table, list[str]]:
    every = [{"search": obj, "trial": r.get("number"), "val acc": float(r["val_acc"]), "MACs frac": r.get("macs_frac"),
              "latency frac (in its search)": r.get("latency_frac")} for obj, rs in rows.items() for r in rs]
    for e, t in zip(every, ms[1:]):  # ms: the base, then each model in the order of rows
        e["latency frac (re-measured)"] = t / ms[0]
    write_points(Path(args.out) / f"{args.name}_points.csv", every)
    points = {obj: np.array([(e["val acc"], e["latency frac (re-measured)"]) for e in every if e["search"] == obj])
              .reshape(-1, 2) for obj in rows}
    fronts = _fronts(points)
    n_val = len(b.data.val)
    ups = speedups(points["latency"], fronts["macs"], n_val)
    labels = {"latency": "objectives [val_acc, latency]", "macs": "objectives [val_acc, macs]"}
    out_rows = []
    for obj in ("latency", "macs"):
        f = fronts[obj]
        out_rows.append({"search": labels[obj], "complete trials": len(points[obj]), "front size": len(f),
                         "hypervolume (acc x latency frac)": acc_cost_hypervolume(points[obj]),
                         "best val acc": float(points[obj][:, 0].max()) if len(points[obj]) else math.nan,
                         "fastest front model (lat frac)": float(f[:, 1].min()) if len(f) else math.nan})
    png = Path(args.out) / f"{args.name}_fronts.png"
    plot(png, {labels["latency"]: points["latency"], labels["macs"]: points["macs"]},
         f"{args.search_case} {b.case.model}: both fronts re-measured at batch 1, {threads} thread(s)")
    hv_l, hv_m = (r["hypervolume (acc x latency frac)"] for r in out_rows)
    med = statistics.median(ups) if ups else math.nan
    base_note = (f"Base: {args.search_base} (val acc {b.base_acc:.4f}), not the quality benchmark's cached base."
                 if args.search_base else f"Base: the quality benchmark's cached base (val acc {b.base_acc:.4f}).")
    notes = (
        base_note,
        (f"Each search: {args.trials} trials, TPE, L1 with uniform / global / searched allocation, target in "
        f"[low, 0.9] (latency search: low = max(0.3, fastest reachable {floor:.3f} + 0.05), round_to {args.round_to}), fine-tune "
        f"{b.case.epochs} epochs on {len(b.data.train)} images, val split of {n_val} images."),
        (f"Every complete model of both searches re-measured against the base (a pair each) at batch 1, "
         f"{threads} thread(s), base {ms[0]:.3f} ms; the search's own trials measured latency with its other "
         "workers paused (one worker here)."),
        (f"Speed-up at equal accuracy (each MACs-front point vs the fastest latency-search model within one SE of its "
        f"accuracy): median {med:.2f}x, min {min(ups, default=math.nan):.2f}x over {len(ups)} points; done when >= 1.3x."),
        (f"Hypervolume in (val acc, measured latency fraction): latency search {hv_l:.4f} vs MACs search {hv_m:.4f} "
        f"({'higher' if hv_l > hv_m else 'not higher'})."),
        f"Plot: {png.name}; every model's accuracy, MACs and latency fractions: {args.name}_points.csv.")
    table = common.Table("search", f"Search for latency vs search for MACs ({args.search_case} {b.case.model})",
                         ("search", "complete trials", "front size", "hypervolume (acc x latency frac)", "best val acc",
                          "fastest front model (lat frac)"), tuple(out_rows), notes)
    return table, []
