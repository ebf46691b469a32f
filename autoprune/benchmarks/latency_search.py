"""Pruning for speed: the latency model's error, latency-targeted vs MACs-targeted models, and the search.

Three parts (issue 27's "Done when"), every timing a ratio inside one run (each model timed
against the base in its own interleaved rounds: :mod:`autoprune.engine.latency_measure`), at 1 and
2 threads, on the CPU:

1. ``model``: the latency model of ResNet-56 and MobileNetV2 (CIFAR, 32x32) and ResNet-50 (224) at
   batch 1 and 32, validated on random held-out width assignments: median / 90th-percentile relative
   error and Spearman's rank correlation (done when the median is <= 10 % and Spearman >= 0.9).
2. ``targets``: L1 + global allocation aimed at a latency fraction of 0.7 / 0.5 / 0.3; measured latency
   fraction (done when within [target - 0.05, target + 0.03]), next to the MACs-targeted model at the
   same MACs fraction (today's default) and Torch-Pruning (magnitude, global, ``round_to=8``) bisected
   to the same MACs fraction. ``--round-to 1 8 auto`` adds a row per width multiple for each target.
3. ``search``: Fashion-MNIST ResNet-20 (the quality benchmark's base, fine-tune subset and recipe), one
   search with objectives [val_acc, latency] and one with [val_acc, macs], same budget; every complete
   model of both re-measured at batch 1 against the base in one run; hypervolume in (val acc, measured
   latency fraction) and the speed-up at equal accuracy (within one standard error); one plot.
4. ``align``: what width rounding gains per runtime (PyTorch eager, and ONNX Runtime where installed):
   the same uniform prune with widths rounded to a multiple of 8, one channel below it, and as a uniform
   prune leaves them (:mod:`.latency_align`).

    python -m autoprune.benchmarks.latency_search                   # everything (tens of minutes)
    python -m autoprune.benchmarks.latency_search --quick           # CI-sized: ResNet-56 only, few trials
    python -m autoprune.benchmarks.latency_search --parts model targets --models resnet56 mobilenetv2
    python -m autoprune.benchmarks.latency_search --parts model --runtime onnxruntime --batches 1 --thread-counts 1

The ``model`` and ``targets`` parts run on PyTorch eager unless ``--runtime onnxruntime`` (the ``export`` extra).
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import pruning as engine
from ..engine.cost import count_macs
from ..engine.graph import find_groups
from ..engine.latency import build_latency_model, measure_models, through_base, without_misalignment
from ..engine.latency_feedback import LatencyFeedback
from ..engine.latency_table import RUNTIMES, LatencyConfig, device_name
from ..engine.latency_validate import validate
from ..errors import AutopruneError
from ..models.registry import create_model
from . import common
from .latency import MODELS, TARGETS  # the same models and targets as the latency benchmark
from .latency_align import align_rows, align_table
from .latency_search_runs import clock_for, run_search_part

log = logging.getLogger(__name__)

BAND = (0.05, 0.03)  # a latency-targeted model lands in [target - 0.05, target + 0.03]


def tp_round8(model: nn.Module, shape: tuple[int, int, int], macs_frac: float) -> nn.Module:
    """Torch-Pruning MetaPruner (L1 magnitude, global, round_to=8) bisected to ``macs_frac`` of our MACs."""
    import copy

    import torch_pruning as tp

    from .tp_baseline import bisect_ratio, classifier_name

    base_macs = count_macs(model, shape)

    def make(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        ignored = [m.get_submodule(classifier_name(m))]
        pruner = tp.pruner.MetaPruner(m, torch.zeros(1, *shape), importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored, round_to=8)
        pruner.step()
        return m

    return bisect_ratio(make, lambda m: count_macs(m, shape), macs_frac * base_macs, iters=9)[1]


def _cfg(args: Any, batch: int, threads: int) -> LatencyConfig:
    return LatencyConfig(runtime=args.runtime, batch_size=batch, threads=threads, rounds=args.rounds,
                         points=args.points, cache_dir=args.cache_dir, clock=clock_for(args, threads))


def model_rows(name: str, args: Any, batches: Sequence[int], threads_list: Sequence[int],
               err_rows: list[dict[str, Any]], tgt_rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """Part 1 and 2 for one model: appends latency-model error rows and targeted-model rows, and calls
    ``save`` after each (batch, threads) so a long run keeps what it measured."""
    spec = MODELS[name]
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    torch.manual_seed(0)
    model = create_model(spec).eval()
    groups = find_groups(model, shape)
    label = f"{name} ({spec.image_size})"
    variants: list[tuple[str, float, nn.Module]] | None = None
    for batch in batches:
        if name == "resnet50" and batch > 1 and args.no_resnet50_b32:
            continue
        for threads in threads_list:
            cfg = _cfg(args, batch, threads)
            start = time.perf_counter()
            lm = build_latency_model(model, groups, shape, cfg)
            build_s = time.perf_counter() - start
            row: dict[str, Any] = {"model": label, "runtime": cfg.runtime, "batch": batch, "threads": threads,
                                   "clock": cfg.clock,
                                   "tables": len(lm.tables),
                                   "misaligned": sum(max(t.misaligned_in, t.misaligned_out) > 1
                                                     for t in lm.tables.values()),
                                   "build s": build_s, "spread %": 100 * float(lm.info.get("spread", 0.0)),
                                   "base ms": lm.measured_base_ms, "scale": lm.scale, "const ms": lm.const}
            if "model" in args.parts and args.validate:
                v = validate(model, groups, lm, shape, cfg, n=args.validate,
                             others={"plain": without_misalignment(lm, groups), "anchored": through_base(lm, groups)})
                row.update({"median err %": 100 * v.median_rel_err, "p90 err %": 100 * v.p90_rel_err,
                            "no misalign. err %": 100 * v.others_median_rel_err["plain"],
                            "through base: frac err %": 100 * v.others_median_frac_err["anchored"],
                            "Spearman": v.spearman, "median frac err %": 100 * v.median_frac_err,
                            "met": "yes" if v.median_rel_err <= 0.10 and v.spearman >= 0.9 else "no",
                            "met (frac)": "yes" if v.median_frac_err <= 0.10 and v.spearman >= 0.9 else "no"})
            err_rows.append(row)
            log.info("%s b%d t%d: %s", name, batch, threads, row)
            if "targets" in args.parts:
                if variants is None:  # MACs-targeted at the target number: does not depend on the device
                    variants = _macs_variants(model, shape, groups, args.targets, kinds=("macs",))
                tgt_rows += _target_rows(label, model, shape, groups, lm, cfg, args.targets, variants, args.feedback,
                                         args.round_tos)
            save()


def _macs_variants(model: nn.Module, shape: tuple[int, int, int], groups: list, targets: Sequence[float],
                   kinds: Sequence[str] = ("macs", "tp8"), tag: str = "") -> list[tuple[str, float, nn.Module]]:
    """L1 (global) pruned to each MACs fraction (kind ``macs``) and Torch-Pruning magnitude with
    round_to=8 bisected to it (``tp8``); ``tag`` is appended to the kind."""
    out = []
    for t in targets:
        if "macs" in kinds:
            try:
                res = engine.prune(model, "l1", t, input_shape=shape, groups=groups, allocation={"mode": "global"},
                                   recalibrate_batches=0)
                out.append(("macs" + tag, t, res.model))
            except AutopruneError as exc:  # e.g. below what the minimum widths reach: that column stays empty
                log.warning("L1 could not reach %.2f of the MACs: %s", t, exc)
        if "tp8" in kinds:
            try:
                out.append(("tp8" + tag, t, tp_round8(model, shape, t)))
            except RuntimeError as exc:
                log.warning("Torch-Pruning round_to=8 could not reach %.2f of the MACs: %s", t, exc)
    return out


def _target_rows(label: str, model: nn.Module, shape: tuple[int, int, int], groups: list, lm: Any,
                 cfg: LatencyConfig, targets: Sequence[float], variants: list[tuple[str, float, nn.Module]],
                 feedback: int = 0, round_tos: Sequence[int | str] = (1,)) -> list[dict[str, Any]]:
    """One row per (target, round_to): L1 global aimed at the latency target with that ``round_to``; every
    model of every row timed against the base in one run (a pair each), so the rows' fractions compare.
    Feedback runs for the first ``round_to`` only."""
    lat: list[tuple[float, int | str, nn.Module | None, float]] = []
    fed: dict[float, tuple[nn.Module, dict[str, Any]]] = {}  # the same, closed on measurement (LatencyFeedback)
    refused: set[float] = set()  # feedback tried and refused (the floor measured above the band)
    for t in targets:
        for r in round_tos:
            try:
                res = engine.prune(model, "l1", t, input_shape=shape, groups=groups,
                                   allocation={"mode": "global", "round_to": r}, objective=lm, recalibrate_batches=0)
                lat.append((t, r, res.model, float(res.info["predicted_frac"])))
            except AutopruneError as exc:  # below the fastest reachable fraction the latency model predicts
                log.warning("%s latency target %.2f (round_to %s): %s", label, t, r, exc)
                lat.append((t, r, None, float("nan")))
        if feedback:  # tried below the model's floor too: feedback times the narrowest widths before refusing
            try:
                res = engine.prune(model, "l1", t, input_shape=shape, groups=groups,
                                   allocation={"mode": "global", "round_to": round_tos[0]}, objective=lm,
                                   recalibrate_batches=0,
                                   feedback=LatencyFeedback.timing(model, groups, shape, cfg, feedback))
                fed[t] = (res.model, res.info["latency_feedback"])
            except AutopruneError as exc:  # the floor measured above the band
                log.warning("%s latency target %.2f with feedback: %s", label, t, exc)
                refused.add(t)
    base_macs = count_macs(model, shape)
    macs_of = {(t, r): count_macs(m, shape) / base_macs for t, r, m, _ in lat if m is not None}
    # at the latency-targeted model's own MACs fraction: which allocation runs faster for the same MACs
    same = [((kind, r), t, m) for (t, r), f in macs_of.items()
            for kind, _, m in _macs_variants(model, shape, groups, [f], tag="=")]
    keyed = [((kind, None), t, m) for kind, t, m in variants] + same
    models = [model] + [m for _, _, m, _ in lat if m is not None] + [m for _, _, m in keyed]
    models += [m for m, _ in fed.values()]
    ms = iter(measure_models(models, shape, cfg, "targeted models"))
    base_ms = next(ms)
    frac_of: dict[tuple[Any, ...], float] = {}
    for t, r, m, _ in lat:
        if m is not None:
            frac_of[("lat", r, t)] = next(ms) / base_ms
    for (kind, r), t, _ in keyed:
        frac_of[(kind, r, t)] = next(ms) / base_ms
    for t in fed:
        frac_of[("fed", None, t)] = next(ms) / base_ms
    nan = float("nan")

    def feedback_cols(t: float | None) -> dict[str, Any]:  # None: a row feedback did not run for
        if t in fed:
            ff = frac_of[("fed", None, t)]
            return {"feedback: lat frac": ff, "feedback: in band": _band(t, ff),
                    "feedback: rounds": len(fed[t][1]["rounds"]), "feedback: aim": fed[t][1]["aim"]}
        return {"feedback: lat frac": nan, "feedback: in band": "refused" if t in refused else "-",
                "feedback: rounds": 0, "feedback: aim": nan}

    rows = []
    for t, r, _, pred in lat:
        f = frac_of.get(("lat", r, t), nan)
        rows.append({"model": label, "runtime": cfg.runtime, "batch": cfg.batch_size, "threads": cfg.n_threads,
                     "clock": cfg.clock, "target": t, "round_to": r,
                     "predicted": pred, "latency frac": f, "in band": _band(t, f),
                     "speed-up": 1 / f, "its MACs frac": macs_of.get((t, r), nan),
                     "same MACs: L1 lat frac": frac_of.get(("macs=", r, t), nan),
                     "same MACs: L1 speed-up": 1 / frac_of.get(("macs=", r, t), nan),
                     "same MACs: TP r8 lat frac": frac_of.get(("tp8=", r, t), nan),
                     "same MACs: TP r8 speed-up": 1 / frac_of.get(("tp8=", r, t), nan),
                     "MACs target = target: lat frac": frac_of.get(("macs", None, t), nan), "base ms": base_ms,
                     **feedback_cols(t if r == round_tos[0] else None)})  # feedback ran for the first only
    return rows


def _band(target: float, frac: float) -> str:
    return "yes" if target - BAND[0] <= frac <= target + BAND[1] else "no"


def _round_to(text: str) -> int | str:
    """``--round-to``: auto or an integer (argparse's choices then check which)."""
    return text if text == "auto" else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("model", "targets", "search", "align"), default=None,
                   help="which parts (default: all)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="models (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 32)")
    p.add_argument("--thread-counts", type=int, nargs="+", default=None, help="torch threads (default 1 2)")
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="latency / MACs fractions")
    p.add_argument("--validate", type=int, default=None, help="held-out random width assignments (30; --quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (5; --quick 3)")
    p.add_argument("--points", type=int, default=5, help="table grid points per width")
    p.add_argument("--no-resnet50-b32", action="store_true", help="skip ResNet-50 at batch 32 (slow on a CPU)")
    p.add_argument("--trials", type=int, default=None, help="trials per search (12; --quick 4)")
    p.add_argument("--ft-subset", type=int, default=None, help="fine-tune images per search trial (quality case)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="timing clock: auto = the thread's CPU time at 1 thread, wall clock at more")
    p.add_argument("--search-case", default=None, choices=("fashionmnist", "digits"),
                   help="the quality benchmark's case the search part runs on (fashionmnist; --quick digits)")
    p.add_argument("--search-base", default=None, help="a trained base checkpoint for the search part instead of "
                   "the quality benchmark's cached (or trained) one")
    p.add_argument("--round-to", nargs="+", default=[1], type=_round_to, choices=(1, 8, 16, 32, "auto"),
                   help="targets part: a row per value for each latency target, all timed in one run; search part "
                   "(one value): the latency search's allocation.round_to (the MACs search keeps the default 1)")
    p.add_argument("--feedback", type=int, default=3, help="targets part: also each latency target closed on "
                   "measurement with this many timed allocations (LatencyFeedback; 0: skip)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="model and targets parts: the runtime the latency model is built and validated on")
    p.add_argument("--name", default="latency_search", help="output file name under --out (.md, .csv, _fronts.png)")
    p.add_argument("--load-note", default="", help="what else ran on the machine, for the table header")
    args = p.parse_args(argv)
    common.setup(args)
    args.parts = args.parts or ["model", "targets", "search", "align"]
    if "search" in args.parts and len(set(args.round_to)) > 1:
        p.error("--round-to: the search part takes one value; run it separately from a targets comparison")
    args.round_tos, args.round_to = list(dict.fromkeys(args.round_to)), args.round_to[0]
    args.validate = args.validate if args.validate is not None else (8 if args.quick else 30)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.trials = args.trials or (4 if args.quick else 12)
    args.search_case = args.search_case or ("digits" if args.quick else "fashionmnist")
    names = args.models or (["resnet56"] if args.quick else list(MODELS))
    batches = args.batches or [1, 32]
    threads_list = args.thread_counts or ([1] if args.quick else [1, 2])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        args.cache_dir = cache  # measured fresh in this run, never an older table
        return _run(args, names, batches, threads_list, start, argv)


def _run(args: Any, names: Sequence[str], batches: Sequence[int], threads_list: Sequence[int], start: float,
         argv: Sequence[str] | None) -> int:
    err_rows: list[dict[str, Any]] = []
    tgt_rows: list[dict[str, Any]] = []
    load = f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" + (
        f"; {args.load_note}" if args.load_note else "")
    runtime = "PyTorch eager" if args.runtime == "torch" else "ONNX Runtime (model and targets parts)"
    where = (f"PyTorch {torch.__version__}, {runtime}, float32, CPU {device_name('cpu')}; {load}. Timings are ratios "
             "inside one run: each model against the base in its own interleaved rounds (a pair), medians. "
             "clock 'cpu': the measuring thread's CPU time (1 thread; leaves out waiting for a core on the "
             "shared machine), 'wall': wall clock.")

    def save(echo: bool = False) -> list[common.Table]:
        out = ([_error_table(err_rows, args, where)] if "model" in args.parts else []) + \
              ([_target_table(tgt_rows, where)] if "targets" in args.parts else [])
        if out and not echo:
            common.write_tables(args.name, out, args.out, common.command_line("latency_search", argv),
                                preamble=[f"Measured under: {load}. Partial: the run is still going."], echo=False)
        return out

    if {"model", "targets"} & set(args.parts):
        for name in names:
            model_rows(name, args, batches, threads_list, err_rows, tgt_rows, save)
    tables = save(echo=True)
    if "align" in args.parts:
        rows = [r for name in names for r in align_rows(name, batches, threads_list, args.rounds,
                                                       lambda t: clock_for(args, t))]
        tables.append(align_table(rows, where))
    preamble: list[str] = []
    if "search" in args.parts:
        table, notes = run_search_part(args)
        tables.append(table)
        preamble += notes
    tables[-1] = common.Table(tables[-1].key, tables[-1].title, tables[-1].columns, tables[-1].rows,
                              (*tables[-1].notes, f"Total benchmark time {time.perf_counter() - start:.0f} s."))
    common.write_tables(args.name, tables, args.out, common.command_line("latency_search", argv),
                        preamble=[f"Measured under: {load}.", *preamble])
    return 0


def _error_table(rows: list[dict[str, Any]], args: Any, where: str) -> common.Table:
    med = [r["median err %"] for r in rows if "median err %" in r]
    notes = (where, (f"Validation: {args.validate} random width assignments per row (an overall fraction in "
             "[0.2, 1], each group jittered x0.7..1.3, odd widths included), none used to fit; measured end to "
             "end, each against the base in its own interleaved rounds (a pair). 'median frac err' compares "
             "fractions of the base."),
             ("Done when: median error <= 10 % and Spearman >= 0.9 on every row ('met': on milliseconds, which "
              "compares the timings of the build with those of the validation, minutes apart, so it includes this "
              "machine's drift in speed; 'met (frac)': on the fraction of the base, the predicted one against the one "
              "measured in the pair, so the drift cancels)."),
             ("'misaligned': tables whose probe found a width off the multiple of 8 slower than the multiple itself "
              "(the factor the model applies to such widths). 'no misalign. err %': the median error of the same "
              "tables with every misalignment factor set to 1 (scale and constant refitted to the same calibration "
              "timings), on the same validation timings: what modelling widths off a multiple of 8 gains. "
              "'through base: frac err %': the median error on the fraction of the base of the same tables with "
              "the line through the measured base (slope fitted on the narrower calibration widths), an ablation "
              "of the fit."),
             f"Median of the rows' median errors: {statistics.median(med):.1f} %." if med else "No validation run.")
    cols = ("model", "runtime", "batch", "threads", "clock", "tables", "misaligned", "build s", "spread %", "base ms",
            "scale", "const ms", "median err %", "p90 err %", "Spearman", "median frac err %", "no misalign. err %",
            "through base: frac err %", "met", "met (frac)")
    return common.Table("model", "Latency model error on held-out width assignments", cols, tuple(rows), notes)


def _target_table(rows: list[dict[str, Any]], where: str) -> common.Table:
    n_in = sum(r["in band"] == "yes" for r in rows)
    fed = [r for r in rows if r.get("feedback: in band", "-") != "-"]
    notes = (where, ("L1 scores, global allocation. 'latency frac': measured latency of the latency-targeted model "
             "over the base's; 'predicted': the latency model's fraction the allocation aimed at; 'in band': within "
             "[target - 0.05, target + 0.03]; 'round_to': the allocation's width multiple (auto: per layer, the multiple the "
             "latency model finds fastest). 'same MACs': pruned to the latency-targeted model's own MACs fraction "
             "('its MACs frac'), so the speed-ups compare allocations at equal MACs: L1 with global allocation "
             "aimed at MACs (today's default), and Torch-Pruning MetaPruner (magnitude, global, round_to=8) bisected "
             "to it. 'MACs target = target': L1 global aimed at target x the base's MACs (what asking for that "
             "number in MACs gives)."),
             ("'feedback': the same latency target closed on measurement (autoprune.engine.latency_feedback: "
              "the widths timed against the base, the aim re-set by the measured ratio, at most 'rounds' timed "
              "allocations; 'aim': the model fraction it settled on); its model is timed again in the table's "
              "own run, so 'feedback: lat frac' is a fresh reading, not the loop's. Below the latency "
              "model's floor ('latency frac' blank) feedback times the narrowest widths first and refuses only a "
              "floor measured above the band (its columns blank then)."),
             f"In band: {n_in} of {len(rows)} rows; " + (
                 f"with feedback {sum(r.get('feedback: in band') == 'yes' for r in fed)} of the {len(fed)} rows "
                 "that ran it ('refused': the floor measured above the band)." if fed else
                 "no row ran feedback (--feedback 0)."))
    cols = ("model", "runtime", "batch", "threads", "clock", "target", "round_to", "predicted", "latency frac", "in band",
            "speed-up",
            "its MACs frac", "same MACs: L1 lat frac", "same MACs: L1 speed-up", "same MACs: TP r8 lat frac",
            "same MACs: TP r8 speed-up", "MACs target = target: lat frac", "feedback: lat frac", "feedback: in band",
            "feedback: rounds", "feedback: aim", "base ms")
    return common.Table("targets", "Latency-targeted vs MACs-targeted models, measured", cols, tuple(rows), notes)


if __name__ == "__main__":
    raise SystemExit(main())
