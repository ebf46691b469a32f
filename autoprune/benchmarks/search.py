"""Search: what the search buys over simpler strategies, and what early stopping saves.

On one base model (small_cnn trained 30 epochs on digits, as in ``quality``) and the README demo's
spec (search_spaces/digits_demo.yaml: space, epochs per trial, constraints, early-stopping rule), runs
N trials each of:

- the full search (TPE over method, target, allocation shape, lr and method parameters);
- random sampling of the same space;
- the same TPE search with the method fixed, once per method;
- the full search with early stopping off (same seed) for the fine-tune epochs early stopping saves,
  and with other early-stopping margins (``--margins``) for the trade-off between epochs and front.

Hypervolume of the feasible complete trials in (val acc up, MACs fraction down) with reference
(acc 0, MACs fraction 1): 1.0 would be 100 % accuracy for free. Single seed by default
(``--seeds`` to average): with few trials the differences are noisy, the table says so.

    python -m autoprune.benchmarks.search            # 20 trials per run, 7 runs
    python -m autoprune.benchmarks.search --quick    # 6 trials per run
    python -m autoprune.benchmarks.search --trials 30 --seeds 0 1 2 --no-single --margins 0.005 0.01 0.02
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

from ..engine.cost import count_macs, count_params
from ..engine.plan import save_base
from ..report.pareto import acc_cost_hypervolume, feasible_points, pareto_mask
from . import common
from .common import DEMO_SPEC, demo_raw, demo_spec

log = logging.getLogger(__name__)

METHODS = ("resrep", "lrf", "fsm", "l1")


def run_one(spec_dict: Mapping[str, Any], work: Path, name: str) -> tuple[list[dict[str, Any]], float]:
    """Run one search in ``work/name``; returns its trials.csv rows and wall seconds."""
    import yaml

    from ..search.runner import run_search
    from ..search.spec import load_spec

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(spec_dict), sort_keys=False))
    start = time.perf_counter()
    result = run_search(load_spec(path), out_dir=work / name, progress=False)
    seconds = time.perf_counter() - start
    log.info("%s: %d trials in %.0f s %s", name, len(result.rows), seconds, result.counts)
    return list(result.rows), seconds


def hypervolume(rows: Sequence[Mapping[str, Any]], first: int | None = None) -> float:
    """Hypervolume of the feasible complete trials among the first ``first`` trials (by number)."""
    rows = sorted(rows, key=lambda r: int(r["number"]))[:first]
    return acc_cost_hypervolume(feasible_points(rows))


def front_size(rows: Sequence[Mapping[str, Any]]) -> int:
    pts = feasible_points(rows)
    return int(np.asarray(pareto_mask(pts, [True, False])).sum()) if len(pts) else 0


def best_under(rows: Sequence[Mapping[str, Any]], macs_frac: float) -> float | None:
    pts = feasible_points(rows)
    under = pts[pts[:, 1] <= macs_frac] if len(pts) else pts
    return float(under[:, 0].max()) if len(under) else None


def epochs_run(rows: Sequence[Mapping[str, Any]]) -> int:
    """Training epochs of every trial (compactor and fine-tune epochs; early-stopped trials' partial ones)."""
    return sum(int(r["epochs_run"] or 0) for r in rows)


def _margin(m: float | None) -> str:
    return "2 standard errors" if m is None else f"{m:g}"


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=None, help="trials per search (default 20; --quick 6)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="search seeds (default: --seed)")
    p.add_argument("--no-single", action="store_true", help="skip the single-method searches")
    p.add_argument("--margins", type=float, nargs="+", default=None,
                   help="early-stopping margins to compare (default: the demo spec's)")
    args = p.parse_args(argv)
    common.setup(args)
    try:
        from ..search import runner  # noqa: F401 - only to fail early with one line
    except ImportError as exc:
        raise SystemExit(f"error: the search layer is not available ({exc})") from None
    from .quality import prepare

    trials = args.trials or (6 if args.quick else 20)
    seeds = args.seeds or [args.seed]
    device = torch.device("cpu")
    start = time.perf_counter()
    b = prepare("digits", device)
    configs: dict[str, dict[str, Any]] = {"full search (TPE, all methods)": {},
                                          "random sampling (all methods)": {"sampler": "random"}}
    if not args.no_single:
        for m in METHODS:
            configs[f"TPE, {m} only"] = {"method": m}
    spec_margin = demo_raw()["early_stop"].get("margin")  # None: one standard error of a val accuracy
    spec_margin = None if spec_margin is None else float(spec_margin)
    margins = [spec_margin, *sorted(set(args.margins or []) - {spec_margin})]
    for m in margins:
        if m != spec_margin:
            configs[f"full search, early-stopping margin {m:g}"] = {"margin": m}
    configs["full search, early stopping off"] = {"early_stop": False}
    results: dict[str, list[tuple[list[dict[str, Any]], float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="autoprune_bench_search_") as tmp:
        work = Path(tmp)
        base = work / "base.pt"
        save_base(base, b.model, b.spec, b.case.data,
                  {"val_acc": b.base_acc, "macs": count_macs(b.model, b.shape), "params": count_params(b.model)})
        for seed in seeds:
            for i, (label, change) in enumerate(configs.items()):
                spec = demo_spec(f"bench{i}_s{seed}", b.case.model, b.case.data.to_dict(), str(base), trials, seed)
                if "sampler" in change:
                    spec["sampler"] = change["sampler"]
                if "method" in change:
                    spec["space"]["method"] = change["method"]
                    spec["space"]["methods"] = {k: v for k, v in (spec["space"].get("methods") or {}).items()
                                                if k == change["method"]}
                if "early_stop" in change:
                    spec["early_stop"] = {**spec.get("early_stop", {}), "enabled": change["early_stop"]}
                if "margin" in change:
                    spec["early_stop"] = {**spec.get("early_stop", {}), "enabled": True, "margin": change["margin"]}
                epochs = spec["space"]["epochs"]
                target_range = (spec["space"]["target"]["low"], spec["space"]["target"]["high"])
                results[label].append(run_one(spec, work, f"bench{i}_s{seed}"))

    def mean(values: Sequence[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return statistics.mean(vals) if vals else None

    half = max(1, trials // 2)
    rows = []
    for label, runs in results.items():
        if "early stopping off" in label or "margin" in label:
            continue
        rows.append({
            "strategy": label, "trials": trials,
            f"HV after {half}": mean([hypervolume(r, half) for r, _ in runs]),
            f"HV after {trials}": mean([hypervolume(r) for r, _ in runs]),
            "front size": mean([front_size(r) for r, _ in runs]),
            "best acc, MACs<=0.3": mean([best_under(r, 0.3) for r, _ in runs]),
            "best acc, MACs<=0.5": mean([best_under(r, 0.5) for r, _ in runs]),
            "early stopped": mean([sum(x["state"] == "early_stopped" for x in r) for r, _ in runs]),
            "failed": mean([sum(x["state"] == "failed" for x in r) for r, _ in runs]),
            "wall s": mean([s for _, s in runs]),
        })
    hv_notes = (
        (f"{trials} trials per run; {len(seeds)} seed(s) {seeds} (means over seeds); base small_cnn on digits, "
        f"val acc {b.base_acc:.4f}; the demo's spec ({DEMO_SPEC.name}: {epochs} epochs per trial, its constraints "
        "and early-stopping rule) with only the base model, seed and max_trials replaced."),
        ("HV: hypervolume of the feasible complete trials in (val acc, MACs fraction), reference (0, 1); "
        "early-stopped and failed trials never count. Higher is better; 1.0 = 100 % accuracy at zero MACs."),
        ("TPE's first 10 trials are its random start-up, drawn like the random sampler's with the same seed, so "
        f"'HV after 10' of the two agree; they part after that. Targets range over {target_range} and digits "
        f"saturates near 99 %, so the HV ceiling is about {0.99 * (1 - target_range[0]):.2f}: differences of "
        "about 0.01 are within noise."),
    )
    off = results["full search, early stopping off"]
    e_off = mean([epochs_run(r) for r, _ in off])
    hv_off = mean([hypervolume(r) for r, _ in off])
    es_rows = []
    for m in margins:
        runs = results["full search (TPE, all methods)" if m == spec_margin
                       else f"full search, early-stopping margin {m:g}"]
        e_on, hv_on = mean([epochs_run(r) for r, _ in runs]), mean([hypervolume(r) for r, _ in runs])
        es_rows.append({
            "run": f"on, margin {_margin(m)}" + (" (the spec's)" if m == spec_margin else ""), "trials": trials,
            "fine-tune epochs run": e_on, "share of epochs": f"{100 * e_on / e_off:.0f} %" if e_off else None,
            "early stopped": mean([sum(x["state"] == "early_stopped" for x in r) for r, _ in runs]),
            f"HV after {trials}": hv_on,
            "HV change": f"{100 * (hv_on - hv_off) / hv_off:+.2f} %" if hv_off else None,
            "wall s": mean([s for _, s in runs]),
        })
    es_rows.append({"run": "off", "trials": trials, "fine-tune epochs run": e_off, "share of epochs": "100 %",
                    "early stopped": 0, f"HV after {trials}": hv_off, "HV change": "",
                    "wall s": mean([s for _, s in off])})
    es_notes = (
        ("Same spec and seeds with early stopping on (at each margin) and off; means over seeds. Epochs counted "
        "per trial from its start (ResRep's compactor epochs included: ResRep reports its masked model's "
        "accuracy once the masked rows are zero, so it can be stopped then). With early stopping on the sampler "
        "sees different results after the first stop, so later trials differ too: compare totals, not trial by "
        "trial. HV change is relative to the run without early stopping."),
        f"Total benchmark time {time.perf_counter() - start:.0f} s.",
    )
    tables = [common.Table("", "Hypervolume after N trials by strategy",
                           ("strategy", "trials", f"HV after {half}", f"HV after {trials}", "front size",
                            "best acc, MACs<=0.3", "best acc, MACs<=0.5", "early stopped", "failed", "wall s"),
                           tuple(rows), hv_notes),
              common.Table("early_stop", "Fine-tune epochs saved by two-objective early stopping",
                           ("run", "trials", "fine-tune epochs run", "share of epochs", "early stopped",
                            f"HV after {trials}", "HV change", "wall s"),
                           tuple(es_rows), es_notes)]
    common.write_tables("search", tables, args.out, common.command_line("search", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
