"""Search vs a hand-tuned Torch-Pruning sweep and vs each of our methods alone, at equal measured compute.

On one base model, validation split and fine-tune set (the quality benchmark's cached Fashion-MNIST
or digits case, or any ``--data npz:...|imagefolder:...`` with ``--base``; ``--ft-subset`` picks
the fine-tune regime), with the same fine-tune function, epochs, lr and batch size for every side:

- **Torch-Pruning sweep**: each criterion (MetaPruner with magnitude, BN-scale, Taylor importance,
  global or uniform; :mod:`.tp_baseline`) at each MACs target, its ratio bisected to the target, BN
  recalibrated and fine-tuned E epochs. Its compute is every criterion's every point (what a user
  who sweeps by hand spends before knowing which is best); its front is the BEST criterion's,
  chosen after the fact: an advantage to Torch-Pruning.
- **Each of our methods alone** (l1, lrf, fsm, resrep; global allocation, default parameters) at
  the same targets: the search must not lose to its own best single method.
- **Our search** (TPE over method, the sweep's MACs targets, allocation incl. the per-layer shape,
  method parameters, distillation from the base (``--distill`` weights, default off or 0.5; the
  other sides fine-tune without it, ``--distill 0`` makes every side the same and ``--ablate
  distill`` measures what it adds); the screening round, screening and early stopping with margins
  in standard errors) with ``budget.compute`` = the sweep's measured seconds; trials are counted in
  order while they fit. Seconds are measured, not counted: process CPU time (or
  synchronised GPU time) around everything a point costs (pruning, recalibration, fidelity, every
  epoch, evaluations); epochs are the second column.
- **Early-stopped trials re-run to the end** (``--rerun``): how many would have finished ahead of
  the best complete trial at no more MACs (what they were judged against).
- **Test column**: each side's validation front, then read once on the test split (never used to choose).

Hypervolume in (val acc up, MACs fraction down) with reference (0, 1).

    python -m autoprune.benchmarks.search_vs_tp --data fashionmnist --seeds 0 --targets 0.5 0.3 0.2
    python -m autoprune.benchmarks.search_vs_tp --data npz:my.npz --base base.pt --ft-subset 0
    python -m autoprune.benchmarks.search_vs_tp --quick                              # digits, minutes
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import DataSpec
from ..engine.plan import save_base
from ..report.pareto import not_started
from . import common
from .quality import CASES, TARGETS, THEIRS, Bench, Case, prepare
from .search_vs_tp_runs import (
    DISTILL,
    SINGLE,
    Side,
    add_test_column,
    rerun_stopped,
    run_search_side,
    search_spec,
    single_methods,
    tp_sweep,
)
from .search_vs_tp_tables import _pts, hv, plot, tables, write_trials

log = logging.getLogger(__name__)

QUICK_THEIRS = ("tp magnitude", "tp bnscale")

# ----------------------------------------------------------------------------- driver


def best_side(sides: Mapping[str, Side]) -> Side:
    return max(sides.values(), key=lambda sd: hv(sd.points()))


@dataclasses.dataclass(frozen=True)
class Options:
    """What one seed runs (the CLI's choices)."""

    labels: tuple[str, ...]  # Torch-Pruning criteria
    targets: tuple[float, ...]
    rerun: int = 8
    es_ablation: bool = False
    singles: tuple[str, ...] = SINGLE
    distill: tuple[float, ...] = DISTILL  # distillation weights the search may use ((0,) = off)
    sensitivity: bool = False  # the round also queues sensitivity-seeded shapes
    ablate: tuple[str, ...] = ()  # extra searches at the same budget, one knob flipped (ABLATIONS)


ABLATIONS = {"distill": lambda o: {"distill": (0.0,) if max(o.distill) > 0 else DISTILL},
             "sensitivity": lambda o: {"sensitivity": not o.sensitivity}}


def _variant_name(key: str, o: Options) -> str:
    flipped = ABLATIONS[key](o)
    if key == "distill":
        return "no distillation" if flipped["distill"] == (0.0,) else "with distillation"
    return "sensitivity shape" if flipped["sensitivity"] else "no sensitivity shape"


def run_seed(b: Bench, work: Path, o: Options, seed: int) -> dict[str, Any]:
    tp = tp_sweep(b, o.labels, o.targets, seed)
    singles = single_methods(b, o.targets, seed, o.singles)
    budget_s = sum(sd.work_s for sd in tp.values())
    base = work / "base.pt"
    name = f"on_s{seed}"
    spec = search_spec(b, base, name, o.targets, seed, compute_s=budget_s, distill=o.distill, sensitivity=o.sensitivity)
    ours, counted, store = run_search_side(b, work, name, spec, budget_s)
    reruns = rerun_stopped(b, work, name, counted, store, o.rerun)
    best_tp, best_single = best_side(tp), best_side(singles)
    for side in (ours, best_tp, best_single):
        add_test_column(b, side)
    out = {"seed": seed, "tp": tp, "singles": singles, "ours": ours, "best_tp": best_tp, "best_single": best_single,
           "counted": counted, "reruns": reruns, "round": store.meta().get("round") or [], "budget_s": budget_s,
           "tp_work_s": budget_s, "single_work_s": sum(sd.work_s for sd in singles.values()), "variants": {}}
    for key in o.ablate:  # the same search and budget with one knob flipped
        vname = f"{key}_s{seed}"
        kw = {"distill": o.distill, "sensitivity": o.sensitivity, **ABLATIONS[key](o)}
        side, _, _ = run_search_side(b, work, vname, search_spec(b, base, vname, o.targets, seed, compute_s=budget_s,
                                                                 **kw), budget_s)
        add_test_column(b, side)
        out["variants"][_variant_name(key, o)] = side
    if o.es_ablation:  # the same number of trials with neither rung (for es_replay)
        none = f"none_s{seed}"
        ran = sum(not r.get("duplicate_of") and not not_started(r) for r in counted)  # not reused
        spec = search_spec(b, base, none, o.targets, seed, compute_s=None, max_trials=max(1, ran),
                           early_stop=False, screen=False, distill=o.distill)
        side, none_rows, _ = run_search_side(b, work, none, spec, None)
        out["none"], out["none_rows"] = side, none_rows
    return out


def small_base(name: str, case: Case | None, images: int) -> Path:
    """A base trained on a fixed ``images``-image part of the training split (the case's epochs, lr and
    batch; validation and test splits unchanged), cached: a quicker base for a shared machine."""
    from ..data.datasets import load_data, subset_split
    from ..models.registry import ModelSpec, create_model
    from ..train import TrainConfig, evaluate, fit
    from .quality import CACHE, _case_key

    case = case or CASES[name]
    path = CACHE / f"base_{Path(name).stem}_{_case_key(dataclasses.replace(case, ft_subset=None))}_{images}img.pt"
    if path.is_file():
        return path
    full = load_data(case.data, "cpu")
    spec = ModelSpec(case.model, full.num_classes, full.in_channels, full.image_size)
    torch.manual_seed(0)
    model = create_model(spec)
    fit(model, subset_split(full.train, images, seed=0), None, TrainConfig(
        epochs=case.base_epochs, lr=case.base_lr, batch_size=case.base_batch_size, seed=0), "cpu", progress=True)
    acc = evaluate(model.eval(), full.val, "cpu")["acc"]
    log.info("base %s trained on %d images: val acc %.4f -> %s", case.model, images, acc, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_base(path, model, spec, case.data, {"val_acc": acc, "train_images": images})
    return path


def custom_case(data: str, model: str, ft_subset: int | None) -> Case:
    """A case for any data set (``npz:...`` / ``imagefolder:...``): the Fashion-MNIST case's schedule."""
    ref = CASES["fashionmnist"]
    return dataclasses.replace(ref, model=model, data=DataSpec(data, seed=0, val_fraction=0.1, test_fraction=0.1),
                               ft_subset=ft_subset)


def _seed_job(job: tuple, b: Bench | None = None) -> dict[str, Any]:
    """One seed in its own work folder (kept under ``keep`` when given, for :mod:`.es_replay`)."""
    opts, seed, keep, prep = job
    b = b or prepare(*prep)

    def in_folder(work: Path) -> dict[str, Any]:
        work.mkdir(parents=True, exist_ok=True)
        save_base(work / "base.pt", b.model, b.spec, b.case.data,
                  {k: b.base[k] for k in ("val_acc", "macs", "params")})
        return run_seed(b, work, opts, seed)

    if keep:
        return in_folder(Path(keep) / f"seed{seed}")
    with tempfile.TemporaryDirectory(prefix="autoprune_bench_search_vs_tp_") as tmp:
        return in_folder(Path(tmp))


def write_outputs(out: Path, suffix: str, name: str, tag: str, b: Bench, results: Sequence[Mapping[str, Any]],
                  labels: Sequence[str], targets: Sequence[float], seconds: float, command: str,
                  distill: Sequence[float] = DISTILL) -> None:
    """The plot (the first seed's fronts), every trial, and the tables of ``results`` (seeds so far)."""
    r0 = results[0]
    plot(out / f"{suffix}.png", {f"autoprune search (seed {r0['seed']})": _pts(r0["ours"]),
                                 f"best Torch-Pruning: {r0['best_tp'].label}": _pts(r0["best_tp"]),
                                 f"best single: {r0['best_single'].label}": _pts(r0["best_single"])},
         f"{b.case.model} on {tag}: search vs Torch-Pruning vs our best single, equal measured compute")
    write_trials(out / f"{suffix}_trials.csv", results)
    common.write_tables(suffix, tables(name, b, results, labels, targets, seconds, distill), out, command,
                        preamble=(f"![fronts]({suffix}.png)",))


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="digits | fashionmnist | npz:PATH | imagefolder:DIR "
                                                "(default fashionmnist; --quick: digits)")
    p.add_argument("--base", default=None, help="a trained base checkpoint for this data (default: the cached one; "
                                                "npz/imagefolder: trained here)")
    p.add_argument("--model", default=None, help="the model (default: the case's, resnet20 for Fashion-MNIST and "
                                                 "npz/imagefolder data; e.g. mobilenetv2, vgg16_bn)")
    p.add_argument("--ft-subset", type=int, default=-1,
                   help="fine-tune images (the regime): default the case's (Fashion-MNIST 1000), 0 = the whole split")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick 0)")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help=f"MACs targets of the sweep (default {TARGETS}; --quick 0.5 0.3 0.2)")
    p.add_argument("--theirs", nargs="+", default=None, choices=tuple(THEIRS),
                   help="Torch-Pruning criteria (default all six; --quick magnitude and bnscale)")
    p.add_argument("--singles", nargs="+", default=list(SINGLE), choices=SINGLE,
                   help="our methods run alone at the targets (default all four)")
    p.add_argument("--rerun", type=int, default=8, help="early-stopped trials to re-run to the end (default 8)")
    p.add_argument("--es-ablation", action="store_true",
                   help="also the same number of trials with neither rung (none_s<seed>, for es_replay)")
    p.add_argument("--distill", type=float, nargs="+", default=list(DISTILL),
                   help=f"distillation weights the search may choose (default {' '.join(map(str, DISTILL))}; 0 = off)")
    p.add_argument("--sensitivity", action="store_true", help="the round also queues sensitivity-seeded shapes")
    p.add_argument("--ablate", nargs="+", default=[], choices=tuple(ABLATIONS),
                   help="also run the search with this knob flipped, same budget (an ablation row per seed)")
    p.add_argument("--base-images", type=int, default=None,
                   help="train the base on this many training images only (a quicker base; cached)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (default 1)")
    p.add_argument("--work", default=None, help="keep each seed's search folders under this folder")
    args = p.parse_args(argv)
    if any(not 0 <= w <= 1 for w in args.distill):  # refused now, not after the sweep
        p.error(f"--distill weights are in [0, 1], got {' '.join(map(str, args.distill))}")
    common.setup(args)
    name = args.data or ("digits" if args.quick else "fashionmnist")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    targets = tuple(args.targets or ((0.5, 0.3, 0.2) if args.quick else TARGETS))
    labels = tuple(args.theirs or (QUICK_THEIRS if args.quick else THEIRS))
    case = custom_case(name, args.model or "resnet20", 1000) if name not in CASES else (
        None if args.model in (None, CASES[name].model) else dataclasses.replace(CASES[name], model=args.model))
    start = time.perf_counter()
    base_path = args.base or (str(small_base(name, case, args.base_images)) if args.base_images else None)
    b = prepare(name, torch.device("cpu"), args.ft_subset, case=case, base_path=base_path)
    prep = (name, torch.device("cpu"), args.ft_subset)
    opts = Options(labels, targets, args.rerun, args.es_ablation, tuple(args.singles), tuple(args.distill),
                   args.sensitivity, tuple(args.ablate))
    jobs = [(opts, s, args.work, prep) for s in seeds]
    out = Path(args.out)
    tag = name if name in CASES else Path(name.split(":", 1)[1]).stem
    tag += "" if case is None or name not in CASES else f"_{case.model}"
    suffix = f"search_vs_tp_{tag}" + ("" if args.ft_subset == -1 else f"_ft{args.ft_subset or 'all'}")
    results: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        """Write the tables of every seed finished so far: a run stopped later keeps them."""
        results.append(r)
        results.sort(key=lambda x: x["seed"])
        write_outputs(out, suffix, name, tag, b, results, labels, targets, time.perf_counter() - start,
                      common.command_line("search_vs_tp", argv), tuple(args.distill))

    if args.jobs > 1 and len(seeds) > 1 and case is None and not base_path:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=common.setup, initargs=(args,)) as pool:
            for future in as_completed([pool.submit(_seed_job, job) for job in jobs]):
                done(future.result())
    else:
        for job in jobs:
            done(_seed_job(job, b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
