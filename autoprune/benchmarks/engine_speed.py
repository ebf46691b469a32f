"""Engine speed: seconds for each engine step on real architectures, on the CPU.

Steps, each the median of ``--repeats`` runs (random-initialised weights; the steps do not
depend on training): channel grouping (Torch-Pruning trace, without and with the trial-removal
check), the analytic cost model, scoring (L1, FSM; LRF's whole run, which scores, allocates and
compensates), allocation to half the MACs in each mode, surgery (applying the plan to a copy) and
the whole ``autoprune.prune(model, "l1", 0.5)``. DESIGN.md section 7 asks for seconds even for
ResNet-50 on a CPU, and the allocation for under a second.

    python -m autoprune.benchmarks.engine_speed            # resnet50, mobilenet_v2, resnet56
    python -m autoprune.benchmarks.engine_speed --quick    # resnet56 and mobilenet_v2, 1 repeat
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..engine import pruning as engine
from ..engine.allocate import AllocationConfig, allocate, select
from ..engine.graph import build_width_cost, find_groups
from ..engine.plan import Plan, apply_plan
from ..methods import PruneContext, get_method, list_methods, make_params
from ..models.registry import ModelSpec, create_model
from . import common

log = logging.getLogger(__name__)

# (label, model spec): torchvision ImageNet models at 224 and the CIFAR ResNet-56 at 32.
MODELS = {
    "resnet50": ("resnet50 (224)", ModelSpec("torchvision:resnet50", 1000, 3, 224)),
    "mobilenet_v2": ("mobilenet_v2 (224)", ModelSpec("torchvision:mobilenet_v2", 1000, 3, 224)),
    "resnet56": ("resnet56 (32)", ModelSpec("resnet56", 10, 3, 32)),
}
TARGET = 0.5
SEARCHED_MULTIPLIERS = (0.75, 1.0, 1.25)  # a plausible searched shape: keep more deeper down


def _shape(spec: ModelSpec) -> tuple[int, int, int]:
    return (spec.in_channels, spec.image_size, spec.image_size)


def time_model(spec: ModelSpec, repeats: int) -> dict[str, float | None]:
    """Median seconds of every step for one architecture (None where a step is unavailable)."""
    shape = _shape(spec)
    torch.manual_seed(0)
    model = create_model(spec).eval()
    out: dict[str, float | None] = {}

    def timed(step: str, fn: Callable[..., Any], setup_fn: Callable[[], Any] | None = None) -> Any:
        result: list[Any] = []

        def run(*arg: Any) -> None:
            result[:] = [fn(*arg)]

        out[step] = common.median_seconds(run, repeats, setup_fn)
        log.info("%s: %s %.3f s", spec.name, step, out[step])
        return result[0]

    timed("grouping (no check)", lambda: find_groups(model, shape, check=False))
    groups = timed("grouping (with check)", lambda: find_groups(model, shape, check=True))
    cost = timed("cost model (build_width_cost)", lambda: build_width_cost(model, groups, shape))

    def context(allocation: AllocationConfig | None = None) -> PruneContext:
        return PruneContext(model=copy.deepcopy(model), groups=groups, cost=cost, target=TARGET,
                            allocation=allocation or AllocationConfig(), device=torch.device("cpu"),
                            input_shape=shape)

    methods = set(list_methods())
    l1 = get_method("l1")
    scores = timed("score: l1", lambda ctx: l1.scores(ctx, make_params(l1, {})), context)
    if "fsm" in methods:
        fsm = get_method("fsm")
        timed("score: fsm (gaussian)", lambda ctx: fsm.scores(ctx, make_params(fsm, {})), context)
    else:
        out["score: fsm (gaussian)"] = None
    if "lrf" in methods:
        lrf = get_method("lrf")
        timed("lrf run (score + allocate + greedy + compensate)", lambda ctx: lrf.finalize(ctx, make_params(lrf, {}), None),
              context)
    else:
        out["lrf run (score + allocate + greedy + compensate)"] = None

    widths: dict[str, int] = {}
    for mode in ("uniform", "global", "searched"):
        cfg = AllocationConfig(mode=mode, multipliers=SEARCHED_MULTIPLIERS if mode == "searched" else ())
        w = timed(f"allocate 0.5: {mode}", lambda c=cfg: allocate(groups, scores, cost, TARGET, c))
        if mode == "global":
            widths = w
    plan = Plan.from_keep(select(scores, widths), groups)
    timed("surgery (apply_plan)", lambda m: apply_plan(m, groups, plan), lambda: copy.deepcopy(model))
    timed("prune(l1, 0.5), groups given", lambda: engine.prune(model, "l1", TARGET, input_shape=shape,
                                                                groups=groups))
    timed("prune(l1, 0.5), end to end", lambda: engine.prune(model, "l1", TARGET, input_shape=shape))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="architectures to time (default: all; --quick: resnet56 mobilenet_v2)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per step (default 3; --quick 1)")
    args = p.parse_args(argv)
    common.setup(args)
    names = args.models or (["mobilenet_v2", "resnet56"] if args.quick else list(MODELS))
    repeats = args.repeats or (1 if args.quick else 3)
    results = {}
    start = time.perf_counter()
    for name in names:
        results[name] = time_model(MODELS[name][1], repeats)
    steps = list(dict.fromkeys(s for r in results.values() for s in r))
    labels = [MODELS[n][0] for n in names]
    rows = tuple({"step": s, **{MODELS[n][0]: results[n].get(s) for n in names}} for s in steps)
    notes = (
        (f"Seconds, median of {repeats} run(s) per step, CPU, {torch.get_num_threads()} torch thread(s); "
        "random-initialised weights (no step depends on training). Blank: method not available."),
        ("grouping = Torch-Pruning dependency trace + our channel maps; 'with check' also removes one channel "
        "of every group in a copy and compares the measured MACs with the analytic count (bisecting failures)."),
        ("allocate = bisection over the shape's scalar with the analytic MACs model + channel-by-channel fill, "
        f"target {TARGET} of base MACs; searched multipliers {SEARCHED_MULTIPLIERS}."),
        "prune(...) = deepcopy + (grouping) + cost model + scores + allocation + surgery + measured MACs check.",
        f"Total benchmark time {time.perf_counter() - start:.0f} s.",
    )
    table = common.Table("", "Engine step times (seconds)", ("step", *labels), rows, notes)
    common.write_tables("engine_speed", [table], args.out, common.command_line("engine_speed", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
