"""Search vs a hand-tuned Torch-Pruning sweep at the same compute (issue 16's benchmark).

On the quality benchmark's cached base and fine-tune subset (:func:`.quality.prepare`; the same
fine-tune function, epochs, lr and batch size for both sides):

- **Torch-Pruning sweep**: each criterion (MetaPruner with magnitude, BN-scale, Taylor importance,
  global or uniform; :mod:`.tp_baseline`) at each MACs target, its ratio bisected to the target,
  BN recalibrated and fine-tuned E epochs. Its compute is every criterion's every point: what a user
  who sweeps by hand spends before knowing which criterion is best. Its front is the BEST criterion's
  (highest hypervolume), chosen after the fact: an advantage to Torch-Pruning.
- **Our search** (TPE over method, MACs target on a 0.1 grid over the same range, allocation shape
  incl. the per-layer log-ratios and the residual multiplier, method parameters; screening at the
  zero-training fidelity: the best 30 % of the candidates within 0.05 of its MACs fraction, from
  the second candidate on; two-objective early stopping with the default margin, one standard
  error) gets the same compute in epoch-equivalents:
  fine-tune epochs run (ResRep's compactor epochs included) plus each trial's pruning, BN
  recalibration and fidelity evaluation converted at the measured seconds of one fine-tune epoch.
  The search runs in chunks (``--resume``) until the budget is reached; trials are then counted in
  order while they fit (the last one that crosses the budget is dropped).
- **Early stopping off**: the same search (same seed, same number of trials as counted above) with
  the epoch rungs off (screening on), and with neither the epoch rungs nor the fidelity rung
  (screening): the epochs each saves and its cost in hypervolume; the methods on each front.
- **Fidelity**: Spearman rank correlation of the accuracy right after pruning + BN recalibration
  with the accuracy after fine-tuning, over the complete trials of all three runs (one-shot methods; ResRep's
  fidelity is taken after its compactor epochs).

Hypervolume in (val acc up, MACs fraction down) with reference (0, 1). One plot with both fronts
(``search_vs_tp_<data>.png``). Validation split only; the test split is never read.

    python -m autoprune.benchmarks.search_vs_tp --data fashionmnist --seeds 0 1 2 --jobs 3  # ~30 min, 2 CPU cores
    python -m autoprune.benchmarks.search_vs_tp --quick                              # digits, 1 seed, minutes
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.plan import save_base
from ..report.pareto import acc_cost_hypervolume, feasible_points, feasible_rows, pareto_mask
from ..report.tables import spearman
from . import common
from .quality import TARGETS, THEIRS, Bench, prepare, run_theirs

log = logging.getLogger(__name__)

QUICK_THEIRS = ("tp magnitude", "tp bnscale")
TARGET_STEP = 0.1  # the search samples the MACs target on this grid (it holds every swept target)
TOL = 0.005  # a point counts as "at" a MACs fraction up to this above it (allocation granularity)
METHOD_SPACE = {"resrep": {"forget_by": {"low": 0.25, "high": 0.9}},  # the demo's; its penalty is inert in short trials
                "lrf": {"compensate": [True, False]}, "fsm": {"compensation": ["gaussian", "measured"]}}


# ----------------------------------------------------------------------------- Torch-Pruning side


def tp_sweep(b: Bench, labels: Sequence[str], targets: Sequence[float], seed: int) -> list[dict[str, Any]]:
    """Every criterion at every target (pruned, recalibrated, fine-tuned): quality's rows."""
    cache: dict = {}
    rows = []
    for label in labels:
        for target in targets:
            common.seed_all(seed)
            try:
                rows.append(run_theirs(b, label, *THEIRS[label], target, seed, cache))
            except Exception as exc:  # noqa: BLE001 - a failed point is reported, the sweep goes on
                log.error("%s @ %.2f failed: %s", label, target, exc)
    return rows


def tp_points(rows: Sequence[Mapping[str, Any]], label: str) -> np.ndarray:
    pts = [(r["val acc after FT"], r["MACs frac"]) for r in rows if r["method"] == label]
    return np.asarray(pts, dtype=float).reshape(-1, 2)


# ----------------------------------------------------------------------------- our side


def search_spec(b: Bench, base: Path, study: str, targets: Sequence[float], seed: int, max_trials: int,
                early_stop: bool, screen: bool = True, target_step: float | None = TARGET_STEP) -> dict[str, Any]:
    """The search both runs use; ``target_step``: the MACs target is sampled on this grid from the
    sweep's lowest to its highest target (None: continuous)."""
    residual = 0 if b.case.model == "small_cnn" else {"low": -1, "high": 1}
    target: dict[str, Any] = {"low": min(targets), "high": max(targets)}
    if target_step:
        target["step"] = target_step
    return {
        "study": study, "model": b.case.model, "data": b.case.data.to_dict(), "base": str(base), "device": "cpu",
        "seed": seed, "sampler": "tpe", "budget": {"max_trials": max_trials},
        "early_stop": {"enabled": early_stop, "min_epochs": 1, "min_trials": 1},
        "screen": {"enabled": screen, "keep": 0.3, "bucket": 0.1, "min_peers": 1},
        "allocation": {"min_ratio": 0.05, "round_to": 1},
        "space": {"method": ["resrep", "lrf", "fsm", "l1"], "target": target,
                  "allocation": ["uniform", "global", "searched"], "buckets": 3, "log_ratio": {"low": -1, "high": 1},
                  "residual": residual, "epochs": b.case.epochs, "lr": b.case.lr, "batch_size": b.case.batch_size,
                  "methods": METHOD_SPACE},
    }


def epoch_equivalents(row: Mapping[str, Any], epoch_s: float) -> float:
    """A trial's compute: epochs run plus (one-shot methods) pruning + recalibration + fidelity seconds
    in fine-tune epochs (ResRep's pruning time is its compactor epochs, already counted)."""
    epochs = float(row.get("epochs_run") or 0)
    prune_s = row.get("prune_s")
    if row.get("method") == "resrep" or prune_s in (None, ""):
        return epochs
    return epochs + float(prune_s) / epoch_s


def run_search_for(b: Bench, work: Path, name: str, spec: dict[str, Any], budget: float | None, epoch_s: float,
                   trials: int | None = None) -> tuple[list[dict[str, Any]], float]:
    """Run our search until ``budget`` epoch-equivalents are spent (or exactly ``trials`` trials); returns
    the counted rows (in trial order, those that fit) and wall seconds."""
    import yaml

    from ..search.runner import run_search
    from ..search.spec import load_spec

    start = time.perf_counter()
    n = trials or max(4, int(budget / b.case.epochs))  # type: ignore[operator]
    resume = False
    while True:
        spec["budget"] = {"max_trials": n}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        result = run_search(load_spec(path), out_dir=work / name, resume=resume, progress=False, data=b.data)
        rows = sorted(result.rows, key=lambda r: int(r["number"]))
        if trials is not None:
            return rows, time.perf_counter() - start
        used = sum(epoch_equivalents(r, epoch_s) for r in rows)
        if used >= budget:  # type: ignore[operator]
            break
        left = budget - used  # type: ignore[operator]
        n = len(rows) + max(1, int(left / b.case.epochs))
        resume = True
    counted, total = [], 0.0
    for r in rows:
        total += epoch_equivalents(r, epoch_s)
        if total > budget:  # type: ignore[operator]
            break
        counted.append(r)
    return counted, time.perf_counter() - start


# ----------------------------------------------------------------------------- measures


hv = acc_cost_hypervolume  # (val acc, MACs fraction) points -> hypervolume, reference (0, 1)


def best_at(points: np.ndarray, macs: float) -> float | None:
    under = points[points[:, 1] <= macs + TOL] if len(points) else points
    return float(under[:, 0].max()) if len(under) else None


def front_methods(rows: Sequence[Mapping[str, Any]], tol: float = TOL) -> set[str]:
    """The methods of the front's points, a point counting only if no other point is more accurate at
    MACs at most ``tol`` above its own: trials at one target land a hair either side of it, and a point
    0.0005 cheaper than a far better one is 'on the front' only by that hair (the same tolerance as
    'best acc <= X')."""
    ok = feasible_rows(rows)
    pts = feasible_points(ok)
    on = [not np.any((pts[:, 0] > a) & (pts[:, 1] <= m + tol)) for a, m in pts]
    return {r["method"] for r, keep in zip(ok, on) if keep}


def fidelity_rho(rows: Sequence[Mapping[str, Any]], oneshot: bool = True) -> tuple[float, int]:
    done = [r for r in rows if r["state"] == "complete" and r.get("fidelity") not in (None, "")
            and (not oneshot or r["method"] != "resrep")]
    if len(done) < 5:
        return float("nan"), len(done)
    return spearman([float(r["fidelity"]) for r in done], [float(r["val_acc"]) for r in done]), len(done)


def plot(path: Path, ours: Mapping[int, np.ndarray], theirs: Mapping[int, tuple[str, np.ndarray]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    right = max([float(p[:, 1].max()) for p in [*ours.values(), *(t for _, t in theirs.values())] if len(p)],
                default=1.0)
    for i, (seed, pts) in enumerate(sorted(ours.items())):
        _front(ax, pts, "tab:blue", f"autoprune search (seed {seed})", "o-", 1.0 - 0.25 * i, right)
    for i, (seed, (label, pts)) in enumerate(sorted(theirs.items())):
        _front(ax, pts, "tab:red", f"best Torch-Pruning sweep: {label} (seed {seed})", "s--", 1.0 - 0.25 * i,
               right)
    ax.set_xlabel("MACs (fraction of the base)")
    ax.set_ylabel("val accuracy after fine-tuning")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _front(ax: Any, pts: np.ndarray, color: str, label: str, style: str, alpha: float, right: float) -> None:
    if not len(pts):
        return
    front = pts[np.asarray(pareto_mask(pts, [True, False]))]
    front = front[np.argsort(front[:, 1])]
    # the attainment curve: at MACs x, the best accuracy of a point with MACs <= x
    ax.step(front[:, 1], front[:, 0], style, where="post", color=color, label=label, alpha=max(alpha, 0.3),
            markersize=5)
    ax.plot([front[-1, 1], right], [front[-1, 0]] * 2, style[1:], color=color, alpha=max(alpha, 0.3))
    ax.scatter(pts[:, 1], pts[:, 0], color=color, alpha=0.15, s=12)


# ----------------------------------------------------------------------------- driver


def run_seed(b: Bench, work: Path, labels: Sequence[str], targets: Sequence[float], seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    tp_rows = tp_sweep(b, labels, targets, seed)
    tp_s = time.perf_counter() - t0
    epoch_s = statistics.median(r["FT s"] / b.case.epochs for r in tp_rows)
    tp_cost = sum(b.case.epochs + r["prune s"] / epoch_s for r in tp_rows)
    by_label = {label: tp_points(tp_rows, label) for label in labels}
    best_label = max(by_label, key=lambda k: hv(by_label[k]))
    base = work / "base.pt"
    on_rows, on_s = run_search_for(b, work, f"on_s{seed}", search_spec(b, base, f"on_s{seed}", targets, seed, 4, True),
                                   tp_cost, epoch_s)
    off_rows, off_s = run_search_for(b, work, f"off_s{seed}",
                                     search_spec(b, base, f"off_s{seed}", targets, seed, 4, False), None, epoch_s,
                                     trials=len(on_rows))
    none_rows, _ = run_search_for(b, work, f"none_s{seed}",
                                  search_spec(b, base, f"none_s{seed}", targets, seed, 4, False, screen=False), None,
                                  epoch_s, trials=len(on_rows))
    ours, theirs = feasible_points(on_rows), by_label[best_label]
    rho_on, n_on = fidelity_rho(on_rows)
    rho_all, n_all = fidelity_rho(list(on_rows) + list(off_rows) + list(none_rows))
    return {
        "seed": seed, "tp_rows": tp_rows, "on_rows": on_rows, "off_rows": off_rows, "none_rows": none_rows,
        "ours": ours,
        "theirs": theirs, "best_label": best_label, "epoch_s": epoch_s, "tp_cost": tp_cost,
        "our_cost": sum(epoch_equivalents(r, epoch_s) for r in on_rows), "tp_s": tp_s, "on_s": on_s, "off_s": off_s,
        "hv_ours": hv(ours), "hv_tp": hv(theirs), "hv_tp_all": {k: hv(v) for k, v in by_label.items()},
        "hv_off": hv(feasible_points(off_rows)), "hv_none": hv(feasible_points(none_rows)),
        "epochs_on": sum(int(r["epochs_run"] or 0) for r in on_rows),
        "epochs_off": sum(int(r["epochs_run"] or 0) for r in off_rows),
        "epochs_none": sum(int(r["epochs_run"] or 0) for r in none_rows),
        "rho": rho_all, "rho_n": n_all, "rho_on": rho_on, "rho_on_n": n_on,
        "front_on": front_methods(on_rows), "front_off": front_methods(off_rows),
        "front_none": front_methods(none_rows),
    }


def write_trials(path: Path, results: Sequence[Mapping[str, Any]]) -> None:
    """Every trial of every run (``run``: both rungs / screening only / neither), for re-analysis."""
    import pandas as pd

    frames = [pd.DataFrame(r[key]).assign(seed=r["seed"], run=run) for r in results
              for key, run in (("on_rows", "both"), ("off_rows", "screening only"), ("none_rows", "neither"))
              if r[key]]
    if frames:
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def _saved(used: int, reference: int) -> str | None:
    return f"{100 * (1 - used / reference):.0f} %" if reference else None


def _change(value: float, reference: float) -> str | None:
    return f"{100 * (value - reference) / reference:+.2f} %" if reference else None


def _fmt_pct(a: float | None, b: float | None) -> str | None:
    return None if a is None or b is None else f"{100 * (a - b):+.2f}"


def tables(name: str, b: Bench, results: Sequence[Mapping[str, Any]], labels: Sequence[str],
           targets: Sequence[float], total_s: float) -> list[common.Table]:
    low = sorted(targets)[:2]
    main_rows, es_rows = [], []
    for r in results:
        row = {"seed": r["seed"], "epoch-equivalents (ours / TP)": f"{r['our_cost']:.1f} / {r['tp_cost']:.1f}",
               "wall s (ours / TP)": f"{r['on_s']:.0f} / {r['tp_s']:.0f}",
               "trials (ours)": len(r["on_rows"]), "complete": sum(x["state"] == "complete" for x in r["on_rows"]),
               "screened out": sum(x.get("stopped_at") == "screen" for x in r["on_rows"]),
               "HV ours": r["hv_ours"], f"HV TP ({r['best_label']})": None, "HV TP best": r["hv_tp"],
               "HV difference": f"{r['hv_ours'] - r['hv_tp']:+.4f}"}
        for t in low:
            a, c = best_at(r["ours"], t), best_at(r["theirs"], t)
            row[f"best acc <= {t:g} ours"] = a
            row[f"best acc <= {t:g} TP"] = c
            row[f"points at {t:g}"] = _fmt_pct(a, c)
        row["TP criterion"] = r["best_label"]
        main_rows.append(row)
        es_rows.append({
            "seed": r["seed"], "trials": len(r["off_rows"]), "epochs: both rungs": r["epochs_on"],
            "epochs: screening only": r["epochs_off"], "epochs: neither": r["epochs_none"],
            "saved by both": _saved(r["epochs_on"], r["epochs_none"]),
            "saved by epoch rungs": _saved(r["epochs_on"], r["epochs_off"]),
            "HV both": r["hv_ours"], "HV screening only": r["hv_off"], "HV neither": r["hv_none"],
            "HV change (both vs neither)": _change(r["hv_ours"], r["hv_none"]),
            "methods on front (both)": ", ".join(sorted(r["front_on"])),
            "methods on front (neither)": ", ".join(sorted(r["front_none"])),
            "fidelity Spearman (n)": f"{r['rho']:.3f} ({r['rho_n']})",
        })
    cols = ["seed", "epoch-equivalents (ours / TP)", "wall s (ours / TP)", "trials (ours)", "complete", "screened out", "HV ours",
            "HV TP best", "HV difference"]
    for t in low:
        cols += [f"best acc <= {t:g} ours", f"best acc <= {t:g} TP", f"points at {t:g}"]
    cols.append("TP criterion")
    r0 = results[0]
    hv_means = (statistics.mean(r["hv_ours"] for r in results), statistics.mean(r["hv_tp"] for r in results))
    notes = (
        (f"{name}: {b.case.model}, base val acc {b.base_acc:.4f}; fine-tune subset {len(b.data.train)} images, "
         f"{b.case.epochs} epochs, lr {b.case.lr}, batch {b.case.batch_size}, val split {len(b.data.val)} images "
         f"(standard error of one accuracy at 90 %: {100 * (0.09 / len(b.data.val)) ** 0.5:.2f} points)."),
        (f"Torch-Pruning sweep: {', '.join(labels)} at targets {', '.join(f'{t:g}' for t in targets)}; its compute "
         "(every criterion, every target) is our budget. 'HV TP best' is the best criterion's front, chosen after "
         "the fact. Epoch-equivalents: fine-tune epochs plus pruning, BN recalibration and (ours) the fidelity "
         f"evaluation, in units of one fine-tune epoch ({r0['epoch_s']:.2f} s, median over the sweep). Not in them: "
         "validation passes (ours: one per epoch, for early stopping; Torch-Pruning's: three per point); the wall "
         "times include everything (a shared machine: noisy)."),
        (f"Mean over seeds: HV ours {hv_means[0]:.4f}, HV TP best {hv_means[1]:.4f}. 'points at X': our best "
         f"accuracy at MACs <= X minus Torch-Pruning's, in points (a point counts up to {TOL} above X)."),
        f"Total benchmark time {total_s:.0f} s.",
    )
    pooled_on, pooled_none = sum(r["epochs_on"] for r in results), sum(r["epochs_none"] for r in results)
    es_notes = (
        ("The same search (same seed, the same number of trials as counted above) three times: with both rungs of "
         "early stopping (the zero-training fidelity rung, i.e. screening, and the epoch rungs), with screening "
         "only, and with neither. 'saved': fine-tune epochs not run, relative to the run named. Epochs include "
         "ResRep's compactor epochs; screened-out trials run none."),
        (f"Methods on front: the methods of the front's points, a point counting only if no point is more accurate "
         f"at MACs at most {TOL} above its own (trials at one target land a hair either side of it). Pooled over "
         f"seeds: both rungs {pooled_on} epochs, neither {pooled_none}: {_saved(pooled_on, pooled_none)} saved."),
        ("Fidelity: Spearman rank correlation of the val accuracy right after pruning + BN recalibration with the "
         "accuracy after fine-tuning, over the complete one-shot (l1, lrf, fsm) trials of all three runs."),
    )
    return [common.Table("", "Our search vs the best Torch-Pruning criterion at the same compute",
                         tuple(cols), tuple(main_rows), notes),
            common.Table("early_stop", "Early stopping and the zero-training fidelity",
                         ("seed", "trials", "epochs: both rungs", "epochs: screening only", "epochs: neither",
                          "saved by both", "saved by epoch rungs", "HV both", "HV screening only", "HV neither",
                          "HV change (both vs neither)", "methods on front (both)", "methods on front (neither)",
                          "fidelity Spearman (n)"),
                         tuple(es_rows), es_notes)]


def _seed_job(job: tuple[str, Sequence[str], Sequence[float], int, str | None],
              b: Bench | None = None) -> dict[str, Any]:
    """One seed in its own work folder (a worker process prepares its own copy of the cached base);
    the folder is kept under ``keep`` when given (for :mod:`.es_replay`), else temporary."""
    name, labels, targets, seed, keep = job
    b = b or prepare(name, torch.device("cpu"))

    def in_folder(work: Path) -> dict[str, Any]:
        work.mkdir(parents=True, exist_ok=True)
        save_base(work / "base.pt", b.model, b.spec, b.case.data,
                  {k: b.base[k] for k in ("val_acc", "macs", "params")})
        return run_seed(b, work, labels, targets, seed)

    if keep:
        return in_folder(Path(keep) / f"seed{seed}")
    with tempfile.TemporaryDirectory(prefix="autoprune_bench_search_vs_tp_") as tmp:
        return in_folder(Path(tmp))


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "fashionmnist"), default=None,
                   help="data set (default fashionmnist; --quick: digits)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick 0)")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help=f"MACs targets of the sweep (default {TARGETS}; --quick 0.5 0.3 0.2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run in parallel processes, each with --threads torch threads (default 1)")
    p.add_argument("--work", default=None,
                   help="keep each seed's search folders under this folder (default: temporary); its none_s<seed> "
                        "searches ran every epoch and can be replayed with autoprune.benchmarks.es_replay")
    args = p.parse_args(argv)
    common.setup(args)
    name = args.data or ("digits" if args.quick else "fashionmnist")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    targets = tuple(args.targets or ((0.5, 0.3, 0.2) if args.quick else TARGETS))
    labels = QUICK_THEIRS if args.quick else tuple(THEIRS)
    start = time.perf_counter()
    b = prepare(name, torch.device("cpu"))
    if args.jobs > 1 and len(seeds) > 1:  # one process per seed (each with --threads torch threads)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=common.setup, initargs=(args,)) as pool:
            results = list(pool.map(_seed_job, [(name, labels, targets, s, args.work) for s in seeds]))
    else:
        results = [_seed_job((name, labels, targets, s, args.work), b) for s in seeds]
    out = Path(args.out)
    suffix = f"search_vs_tp_{name}"
    plot(out / f"{suffix}.png", {r["seed"]: r["ours"] for r in results},
         {r["seed"]: (r["best_label"], r["theirs"]) for r in results},
         f"{b.case.model} on {name}: our search vs the best Torch-Pruning criterion at the same compute")
    write_trials(out / f"{suffix}_trials.csv", results)
    common.write_tables(suffix, tables(name, b, results, labels, targets, time.perf_counter() - start), out,
                        common.command_line("search_vs_tp", argv),
                        preamble=(f"![both fronts]({suffix}.png)",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
