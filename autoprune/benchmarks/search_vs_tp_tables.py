"""The tables, plot and per-seed measures of :mod:`.search_vs_tp` (hypervolume, best at a MACs
fraction, differences against two standard errors, the ablation rows)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..report.pareto import acc_cost_hypervolume, feasible_points, feasible_rows, not_started, pareto_mask
from ..report.tables import spearman
from ..search.early_stop import accuracy_se
from . import common
from .quality import Bench
from .search_vs_tp_runs import DISTILL, Side

TOL = 0.005  # a point counts as "at" a MACs fraction up to this above it (allocation granularity)

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


def plot(path: Path, fronts: Mapping[str, np.ndarray], title: str) -> None:
    """One attainment curve per side (label -> (val acc, MACs fraction) points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    right = max([float(p[:, 1].max()) for p in fronts.values() if len(p)], default=1.0)
    for (label, pts), (color, style) in zip(fronts.items(), (("tab:blue", "o-"), ("tab:red", "s--"),
                                                            ("tab:green", "^:"), ("tab:gray", "x-."))):
        _front(ax, pts, color, label, style, 1.0, right)
    common.save_front_plot(fig, ax, path, "MACs (fraction of the base)", title, legend_size=7)


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



def _pts(side: Side, key: str = "val_acc") -> np.ndarray:
    return side.points(key)


def _test_at(side: Side, macs: float) -> float | None:
    """Test accuracy of the point chosen on validation as the best at MACs <= ``macs``."""
    rows = [r for r in side.rows if r.get("val_acc") is not None and r["macs_frac"] <= macs + TOL]
    if not rows:
        return None
    # a tie in validation accuracy goes to the cheaper point: the one on the front, whose test accuracy was read
    return max(rows, key=lambda r: (r["val_acc"], -r["macs_frac"], r.get("test_acc") is not None)).get("test_acc")


def _diff(a: float | None, c: float | None, n: int) -> str | None:
    """Difference in points with two standard errors of a difference of two accuracies."""
    if a is None or c is None:
        return None
    se2 = 2 * (2 ** 0.5) * accuracy_se((a + c) / 2, n)
    verdict = "beyond 2 SE" if abs(a - c) > se2 else "noise"
    return f"{100 * (a - c):+.2f} ({100 * se2:.2f}, {verdict})"


def _hv_test(side: Side) -> float:
    return hv(_pts(side, "test_acc"))


def seed_rows(r: Mapping[str, Any], low: Sequence[float], n_val: int, n_test: int) -> tuple[dict, dict]:
    ours, tp, single = r["ours"], r["best_tp"], r["best_single"]
    counted = r["counted"]
    main = {"seed": r["seed"],
            "measured s (ours / TP sweep / singles)": f"{ours.work_s:.0f} / {r['tp_work_s']:.0f} / {r['single_work_s']:.0f}",
            "epochs (ours / TP / singles)": f"{ours.epochs} / {sum(sd.epochs for sd in r['tp'].values())} / "
                                            f"{sum(sd.epochs for sd in r['singles'].values())}",
            "trials (complete / screened / stopped / reused / not started)":
                f"{len(counted)} ({sum(x['state'] == 'complete' and not x.get('duplicate_of') for x in counted)} / "
                f"{sum(x.get('stopped_at') == 'screen' for x in counted)} / "
                f"{sum(str(x.get('stopped_at', '')).startswith('epoch') for x in counted)} / "
                f"{sum(bool(x.get('duplicate_of')) for x in counted)} / "
                f"{sum(not_started(x) for x in counted)})",
            "HV ours": hv(_pts(ours)), "HV TP best": hv(_pts(tp)), "TP criterion": tp.label,
            "HV single best": hv(_pts(single)), "single method": single.label,
            "HV ours - TP": f"{hv(_pts(ours)) - hv(_pts(tp)):+.4f}",
            "HV ours - single": f"{hv(_pts(ours)) - hv(_pts(single)):+.4f}"}
    test = {"seed": r["seed"], "test HV ours": _hv_test(ours), "test HV TP best": _hv_test(tp),
            "test HV single best": _hv_test(single),
            "sign agrees (HV vs TP)": np.sign(_hv_test(ours) - _hv_test(tp)) == np.sign(hv(_pts(ours)) - hv(_pts(tp)))}
    for t in low:
        a, c, s = best_at(_pts(ours), t), best_at(_pts(tp), t), best_at(_pts(single), t)
        main[f"<= {t:g}: ours / TP / single"] = " / ".join("-" if v is None else f"{v:.4f}" for v in (a, c, s))
        main[f"<= {t:g}: ours - TP (2 SE)"] = _diff(a, c, n_val)
        main[f"<= {t:g}: ours - single (2 SE)"] = _diff(a, s, n_val)
        ta, tc = _test_at(ours, t), _test_at(tp, t)
        test[f"<= {t:g} test: ours / TP"] = " / ".join("-" if v is None else f"{v:.4f}" for v in (ta, tc))
        test[f"<= {t:g} test: ours - TP (2 SE)"] = _diff(ta, tc, n_test)
        test[f"<= {t:g} sign agrees"] = None if None in (a, c, ta, tc) or a == c else bool(np.sign(a - c) == np.sign(ta - tc))
    return main, test


ABLATION_NOTES = (("Per seed: the main search ('as run') against the same search, seed and measured budget with one "
                   "knob flipped. 'mean' rows: the mean over seeds of the difference (variant - as run) with two "
                   "standard errors of that mean (seed-to-seed spread, n-1; for accuracies never below the binomial "
                   "one of the validation split at their mean accuracy); 'noise' when inside them. A knob is on by "
                   "default only where it moves the result beyond that."),)


def ablation_rows(results: Sequence[Mapping[str, Any]], low: Sequence[float], n_val: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    diffs: dict[str, dict[str, list[float]]] = {}
    levels: dict[str, list[float]] = {}  # the accuracies compared, for the binomial floor
    for r in results:
        main = _pts(r["ours"])
        for vname, side in r.get("variants", {}).items():
            v = _pts(side)
            row: dict[str, Any] = {"seed": r["seed"], "variant": vname, "HV as run": hv(main), "HV variant": hv(v),
                                   "HV variant - as run": f"{hv(v) - hv(main):+.4f}"}
            d = diffs.setdefault(vname, {"HV": []})
            d["HV"].append(hv(v) - hv(main))
            for t in low:
                a, c = best_at(main, t), best_at(v, t)
                row[f"<= {t:g}: as run / variant"] = " / ".join("-" if x is None else f"{x:.4f}" for x in (a, c))
                row[f"<= {t:g}: variant - as run (2 SE)"] = _diff(c, a, n_val)
                if a is not None and c is not None:
                    d.setdefault(f"<= {t:g}", []).append(100 * (c - a))
                    levels.setdefault(f"<= {t:g}", []).append((a + c) / 2)
            rows.append(row)
    for vname, d in diffs.items():
        row = {"seed": "mean", "variant": vname}
        for key, xs in d.items():
            m = float(np.mean(xs))
            if len(xs) < 2:
                row[key] = f"{m:+.4f} (n/a: one seed)" if key == "HV" else f"{m:+.2f} pts (n/a: one seed)"
                continue
            se2 = 2 * float(np.std(xs, ddof=1)) / len(xs) ** 0.5
            if key != "HV":  # never below the binomial SE of a mean difference of accuracies on n_val images
                se2 = max(se2, 2 * 100 * accuracy_se(float(np.mean(levels[key])), n_val) * (2 / len(xs)) ** 0.5)
            verdict = "beyond 2 SE" if abs(m) > se2 else "noise"
            row[key] = f"{m:+.4f} ({se2:.4f}, {verdict})" if key == "HV" else f"{m:+.2f} pts ({se2:.2f}, {verdict})"
        rows.append(row)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return [{c: row.get(c) for c in cols} for row in rows]


def tables(name: str, b: Bench, results: Sequence[Mapping[str, Any]], labels: Sequence[str],
           targets: Sequence[float], total_s: float, distill: Sequence[float] = DISTILL) -> list[common.Table]:
    low = sorted(targets)[:2]
    n_val, n_test = len(b.data.val), len(b.data.test)
    mains, tests, reruns, rounds = [], [], [], []
    for r in results:
        m, t = seed_rows(r, low, n_val, n_test)
        mains.append(m)
        tests.append(t)
        reruns += [{"seed": r["seed"], **x} for x in r["reruns"]]
        rounds += [{"seed": r["seed"], "method": p["method"], "target": p["target"], "fidelity": p["fidelity"],
                    "MACs frac": p["macs_frac"], "work s": p["work_s"]} for p in r["round"]]
    ablation = ablation_rows(results, low, n_val)
    ft = len(b.data.train)
    notes = (
        (f"{name}: {b.case.model}, base val acc {b.base_acc:.4f}; fine-tune set {ft} images, {b.case.epochs} epochs, "
         f"lr {b.case.lr}, batch {b.case.batch_size}; val split {n_val} images (one accuracy's standard error at 90 %: "
         f"{100 * accuracy_se(0.9, n_val):.2f} points; '2 SE' columns: two standard errors of a difference of two "
         "accuracies)."),
        (f"Torch-Pruning sweep: {', '.join(labels)} at {', '.join(f'{t:g}' for t in targets)}; its measured seconds "
         f"(every criterion, every target) are the search's budget.compute. 'single': each of "
         f"{', '.join(sorted(results[0]['singles']))} alone (global, default parameters) at the same targets; the "
         f"best one's front. Seconds: process CPU time ({torch.get_num_threads()} torch thread(s), all of them counted) "
         "around all of a point's work, the search's screening round included."),
        (f"The search may distil from the base (weights {', '.join(f'{w:g}' for w in distill)}; 0 = off); the sweep and "
         "the single methods fine-tune without distillation (the ablation table, when run, gives the search without it)."),
        f"Total benchmark wall time {total_s:.0f} s (a shared machine).",
    )
    test_notes = (("Each side's validation front, each point's model read once on the test split; 'best at <= X' "
                   "is the point chosen on validation. Never used to choose anything."),)
    rerun_notes = (("Every early-stopped trial of the search (epoch stops first, then screened-out ones, up to --rerun) "
                   "re-run to the end with the same configuration and training seed, against the best complete trial "
                   "at no more MACs (1 % tolerance). 'ahead beyond 2 SE': by more than two standard errors of a "
                   f"difference. Would have finished ahead: {sum(bool(x['ahead']) for x in reruns)} of {len(reruns)}."),)
    out = [common.Table("", "Our search vs the best Torch-Pruning criterion and our best single method, equal measured "
                        "compute", tuple(mains[0]), tuple(mains), notes),
           common.Table("test", "The fronts on the test split", tuple(tests[0]), tuple(tests), test_notes)]
    if reruns:
        out.append(common.Table("rerun", "Early-stopped trials run to the end", tuple(reruns[0]), tuple(reruns),
                                rerun_notes))
    if ablation:
        out.append(common.Table("ablation", "Ablation: the same search and budget with one knob flipped",
                                tuple(ablation[0]), tuple(ablation), ABLATION_NOTES))
    if rounds:
        out.append(common.Table("round", "The screening round (zero-training fidelity after BN recalibration)",
                                tuple(rounds[0]), tuple(rounds), ()))
    return out


def write_trials(path: Path, results: Sequence[Mapping[str, Any]]) -> None:
    """Every trial of the search (and of the no-early-stopping search with --es-ablation)."""
    import pandas as pd

    frames = [pd.DataFrame(r[key]).assign(seed=r["seed"], run=run) for r in results
              for key, run in (("counted", "search"), ("none_rows", "neither rung")) if r.get(key)]
    if frames:
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(frames, ignore_index=True).to_csv(path, index=False)
