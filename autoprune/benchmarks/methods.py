"""Methods: does each method's own machinery earn its place? Ablations on the quality benchmark's base.

Same base, data, fine-tune subset, BN recalibration and fine-tune function as
:mod:`autoprune.benchmarks.quality` (rows measured by its ``measure``); only the method parameters
change, so every difference is the parameter's:

- LRF: ``fit`` features vs weights, each with and without ``compensate`` (one-shot: compare "after BN
  recal", before any fine-tuning);
- FSM: ``compensation`` gaussian vs measured vs none (one-shot);
- ResRep: ``forget_by`` at both ends of the searched range, and ``penalty`` at both ends of its old
  range (1e-5 / 1e-2), trained for its share of the epochs (compare "after FT" and the kept channels);
- L1 as the reference.

A table per case with mean and sd over seeds, and for ResRep the number of distinct kept-channel
plans per configuration set (1 = the parameter did not change which channels go).

    python -m autoprune.benchmarks.methods                 # fashionmnist, targets 0.7 0.5 0.3, seeds 0 1 2
    python -m autoprune.benchmarks.methods --quick         # digits, 0.5, seed 0 (CI-sized)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .. import engine
from ..calibrate import DEFAULT_BATCHES
from ..methods import get_method, make_params
from ..train import resolve_device
from . import common
from .quality import Bench, measure, prepare
from .quality_tables import aggregate

log = logging.getLogger(__name__)

# label -> (method, parameters); allocation is global for all
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "l1": ("l1", {}),
    "lrf features + compensate": ("lrf", {"fit": "features", "compensate": True}),
    "lrf features, no compensation": ("lrf", {"fit": "features", "compensate": False}),
    "lrf weights + compensate": ("lrf", {"fit": "weights", "compensate": True}),
    "lrf weights, no compensation": ("lrf", {"fit": "weights", "compensate": False}),
    "fsm gaussian": ("fsm", {"compensation": "gaussian"}),
    "fsm measured": ("fsm", {"compensation": "measured"}),
    "fsm none": ("fsm", {"compensation": "none"}),
    "resrep forget_by 0.25": ("resrep", {"forget_by": 0.25}),
    "resrep forget_by 0.9": ("resrep", {"forget_by": 0.9}),
    "resrep penalty 1e-5": ("resrep", {"penalty": 1e-5}),
    "resrep penalty 1e-2": ("resrep", {"penalty": 1e-2}),
}
QUICK = ("l1", "lrf features + compensate", "lrf weights + compensate", "fsm gaussian", "fsm none")
COLUMNS = ("method", "target", "MACs frac", "val acc after BN recal", "val acc after BN recal sd",
           "val acc after FT", "val acc after FT sd", "plans", "prune s")


def run_config(b: Bench, label: str, target: float, seed: int) -> dict[str, Any]:
    """One pruned model of ``label`` at ``target``: the quality benchmark's row plus its plan's hash."""
    method, params = CONFIGS[label]
    impl = get_method(method)
    k = min(b.case.epochs, max(0, int(impl.training_epochs(make_params(impl, params), b.case.epochs))))
    start = time.perf_counter()
    res = engine.prune(b.model, method, target, data=b.data, allocation={"mode": "global"}, input_shape=b.shape,
                       device=b.device, train_cfg=b.cfg(k, seed), recalibrate_batches=0, **params)
    plan = hashlib.sha1(json.dumps(res.plan.keep, sort_keys=True).encode()).hexdigest()[:10]
    return measure(b, label, target, seed, res.model, k, time.perf_counter() - start, plan=plan)


def table(name: str, b: Bench, rows: Sequence[Mapping[str, Any]]) -> common.Table:
    df = aggregate(rows)
    plans: dict[tuple[str, float], set] = {}
    for r in rows:
        plans.setdefault((r["method"], r["target"]), set()).add(r.get("plan"))
    out = []
    for _, rec in df.iterrows():
        key = (rec["method"], rec["target"])
        out.append({**{c: rec[c] for c in COLUMNS if c in rec}, "plans": len(plans[key])})
    notes = ((f"Base: {b.spec.name} on {name}, val acc {b.base_acc:.4f}; {b.case.epochs} epochs per pruned model "
             f"(ResRep trains its share with compactors, the rest fine-tunes) on {len(b.data.train)} images; "
             f"BN recalibration on {b.recal_batches} batches."),
             ("plans: distinct kept-channel plans over the seeds (one-shot methods prune the same channels "
             "every seed; for ResRep, compare plans across its rows)."))
    return common.Table("" if name == "fashionmnist" else name, f"Method ablations on {name}", COLUMNS,
                        tuple(out), notes)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="quality case (default: fashionmnist; --quick: digits)")
    p.add_argument("--targets", nargs="+", type=float, default=None, help="MACs targets (default 0.7 0.5 0.3)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1 2; --quick 0)")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None, help="configurations to run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    common.setup(args)
    name = args.data or ("digits" if args.quick else "fashionmnist")
    targets = tuple(args.targets or ((0.5,) if args.quick else (0.7, 0.5, 0.3)))
    seeds = tuple(args.seeds if args.seeds is not None else ((0,) if args.quick else (0, 1, 2)))
    labels = tuple(args.configs or (QUICK if args.quick else CONFIGS))
    b = prepare(name, resolve_device(args.device), recal_batches=DEFAULT_BATCHES)
    rows = []
    start = time.perf_counter()
    for seed in seeds:
        for target in targets:
            for label in labels:
                common.seed_all(seed)
                rows.append(run_config(b, label, target, seed))
    t = table(name, b, rows)
    t = dataclasses.replace(t, notes=(*t.notes, f"Total time {time.perf_counter() - start:.0f} s."))
    common.write_tables("methods" + ("" if name == "fashionmnist" else f"_{name}"), [t], args.out,
                        common.command_line("methods", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
