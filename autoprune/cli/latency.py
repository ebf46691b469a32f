"""Subcommand ``latency`` (see the device) and the latency options of ``prune`` (``--cost latency``)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import AutopruneError
from . import apply_threads, common_options

RUNTIME_HELP = "torch (eager PyTorch on --device) | onnxruntime (CPU; needs the export extra)"


def latency_options(p: argparse.ArgumentParser, batch_nargs: str | None = None) -> None:
    """``--batch-size``, ``--runtime`` and the measuring effort; ``--threads`` comes from common_options."""
    if batch_nargs:
        p.add_argument("--batch-size", type=int, nargs=batch_nargs, default=[1], metavar="N",
                       help="batch sizes to measure at, e.g. --batch-size 1 32")
    else:
        p.add_argument("--latency-batch-size", "--batch-size", dest="latency_batch_size", type=int, default=1,
                       metavar="N", help="with --cost latency: the batch size latency is measured and targeted at")
    p.add_argument("--runtime", default="torch", help=RUNTIME_HELP)
    p.add_argument("--latency-rounds", type=int, default=5, help="interleaved timing rounds per measurement")
    p.add_argument("--latency-points", type=int, default=5, help="grid points per width of a layer's table")
    p.add_argument("--no-latency-cache", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--latency-clock", default="wall", choices=("wall", "cpu"),
                   help="wall: wall-clock latency; cpu: the measuring thread's CPU time (one thread; on a machine "
                        "shared with other work it leaves out waiting for a core)")


def latency_config(args: argparse.Namespace, batch: int, device: torch.device | str, threads: int) -> Any:
    """A LatencyConfig from the options (bad runtime, batch size or extra: one AutopruneError)."""
    from ..engine.latency_table import LatencyConfig

    dev = torch.device(device)
    return LatencyConfig(runtime=args.runtime, device="cpu" if args.runtime == "onnxruntime" else str(dev),
                         batch_size=batch, threads=threads, rounds=args.latency_rounds, points=args.latency_points,
                         use_cache=not args.no_latency_cache, clock=args.latency_clock)


def check_early(args: argparse.Namespace, batches: list[int]) -> None:
    """Every latency option problem, before anything loads or measures."""
    from ..engine.latency_table import check_runtime

    for b in batches:
        if b < 1:
            raise AutopruneError(f"--batch-size must be at least 1, got {b}")
    check_runtime(args.runtime, "cpu")
    if args.latency_rounds < 1 or args.latency_points < 2:
        raise AutopruneError("--latency-rounds must be at least 1 and --latency-points at least 2")


def feedback_note(fb: dict[str, Any] | None) -> str:
    """The latency line's note on the feedback rounds (the aim the allocation was given)."""
    if not fb:
        return ""
    n = len(fb["rounds"])
    return (f"; aimed at {100 * fb['aim']:.1f}% of the model after {n} timed allocation{'s' * (n > 1)}"
            + ("" if fb["in_band"] else ", none in band"))


@contextlib.contextmanager
def shown_progress() -> Iterator[None]:
    """Show :mod:`autoprune.progress` phases on stderr (the shared console reporter where present)."""
    from .. import progress as _progress

    if _progress.installed() is not None:  # the CLI's console (autoprune.cli.main) already shows them
        yield
        return
    try:
        from ..progress_view import console  # type: ignore[attr-defined]
    except ImportError:
        console = None
    if console is not None:
        with console():
            yield
        return
    from .. import progress

    class Lines:
        def start(self, phase: progress.Phase) -> None:
            print(f"{'  ' * phase.depth}{phase.name} ...", file=sys.stderr, flush=True)

        def update(self, phase: progress.Phase) -> None:
            if phase.total:
                print(f"{'  ' * phase.depth}{phase.name}: {phase.done}/{phase.total} {phase.unit}",
                      file=sys.stderr, flush=True)

        def end(self, phase: progress.Phase) -> None:
            print(f"{'  ' * phase.depth}{phase.name} done in {time.monotonic() - phase.started:.1f} s",
                  file=sys.stderr, flush=True)

    with progress.use(Lines()):
        yield


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="this device's latency model of a base model: per-layer shares, its "
                       "validation error, and the speed-up of uniform / global prunes")
    p.add_argument("--base", required=True, help="base checkpoint from `autoprune train`")
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3], help="prune targets to time")
    p.add_argument("--validate", type=int, default=30, metavar="N",
                   help="random held-out width assignments to measure the model's error on (0: skip)")
    p.add_argument("--top", type=int, default=12, help="layers to list by share of the base latency")
    latency_options(p, batch_nargs="+")
    common_options(p)
    p.set_defaults(func=cmd_latency)


def cmd_latency(args: argparse.Namespace) -> int:
    from ..engine.graph import find_groups
    from ..engine.latency import build_latency_model, describe
    from ..engine.latency_validate import validate
    from ..engine.plan import load_base
    from ..models.registry import ModelSpec
    from ..train import resolve_device

    check_early(args, list(args.batch_size))
    threads = apply_threads(args)
    device = resolve_device(args.device)
    model, ckpt = load_base(args.base, device)
    if ckpt["format"] != "autoprune.base/1":
        raise AutopruneError(f"{args.base} is already pruned; give its base model")
    spec = ModelSpec.from_dict(ckpt["model"])
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    groups = find_groups(model, shape)
    with shown_progress():
        for batch in args.batch_size:
            cfg = latency_config(args, batch, device, threads)
            lm = build_latency_model(model, groups, shape, cfg)
            print(f"\n== {spec.name} at {shape[1]}x{shape[2]}, {describe(lm)}")
            _print_shares(lm, args.top)
            if args.validate:
                v = validate(model, groups, lm, shape, cfg, n=args.validate)
                print(f"latency model error on {v.n} random held-out width assignments: median "
                      f"{100 * v.median_rel_err:.1f} %, 90th percentile {100 * v.p90_rel_err:.1f} %, Spearman "
                      f"{v.spearman:.3f} (fractions of the base: median {100 * v.median_frac_err:.1f} %)")
            _print_curve(model, groups, shape, lm, cfg, args.targets)
    return 0


def _print_shares(lm: Any, top: int) -> None:
    per = lm.layer_ms({})
    total = sum(per.values()) or 1.0
    rest = lm.base - lm.scale * total
    print(f"{'layer':44s} {'ms':>9s} {'share':>7s}")
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    for name, ms in ranked[:top]:
        print(f"{name[:44]:44s} {lm.scale * ms:9.3f} {100 * lm.scale * ms / lm.base:6.1f}%")
    if len(ranked) > top:
        others = sum(ms for _, ms in ranked[top:])
        print(f"{f'({len(ranked) - top} more layers)':44s} {lm.scale * others:9.3f} "
              f"{100 * lm.scale * others / lm.base:6.1f}%")
    # negative: each layer timed alone pays the per-call overhead that the whole model pays once
    label = "(unpruned rest: pooling, additions, overhead)" if rest >= 0 else "(per-call overhead counted in each layer)"
    print(f"{label:44s} {rest:9.3f} {100 * rest / lm.base:6.1f}%")


def _print_curve(model: Any, groups: Any, shape: tuple[int, int, int], lm: Any, cfg: Any,
                 targets: list[float]) -> None:
    """Measured speed-up of L1 prunes at each target: MACs-targeted uniform and global, latency-targeted global."""
    from ..engine.latency import measure_models
    from ..engine.pruning import prune

    variants: list[tuple[str, float, Any]] = []
    for t in targets:
        for label, alloc, objective in (("MACs, uniform", "uniform", None), ("MACs, global", "global", None),
                                        ("latency, global", "global", lm)):
            try:
                res = prune(model, "l1", t, input_shape=shape, groups=groups, allocation={"mode": alloc},
                            objective=objective, recalibrate_batches=0)
            except AutopruneError as exc:
                print(f"target {t:g} ({label}): {exc}")
                continue
            variants.append((label, t, res))
    ms = measure_models([model] + [r.model for _, _, r in variants], shape, cfg, "latency of pruned models")
    print(f"\n{'target':>6s}  {'aimed at':16s} {'MACs frac':>9s} {'pred. lat frac':>14s} {'latency ms':>10s} "
          f"{'lat frac':>8s} {'speed-up':>8s}")
    print(f"{'base':>6s}  {'':16s} {1.0:9.3f} {1.0:14.3f} {ms[0]:10.3f} {1.0:8.3f} {1.0:8.2f}x")
    for (label, t, r), m in zip(variants, ms[1:]):
        pred = lm.value(r.plan.widths()) / lm.base
        print(f"{t:6.2f}  {label:16s} {r.macs_fraction:9.3f} {pred:14.3f} {m:10.3f} {m / ms[0]:8.3f} "
              f"{ms[0] / m:7.2f}x")
