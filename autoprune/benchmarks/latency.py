"""Real speed: measured latency of pruned vs base models, next to their MACs ratio.

A pruned model must be physically smaller (DESIGN.md section 7): this measures it. Each model is
pruned with L1 scores and global allocation to 0.7 / 0.5 / 0.3 of its MACs, then every variant's
forward pass is timed at batch 1 and 32 (median ms). Variants are timed in interleaved rounds
(base, 0.7, 0.5, 0.3, base, ...) and each cell is the median over rounds, so load that drifts on
a shared machine hits them alike. Weights are random: latency depends on shapes, not values.

    python -m autoprune.benchmarks.latency           # resnet56, mobilenetv2 (CIFAR), resnet50 (224)
    python -m autoprune.benchmarks.latency --quick   # fewer rounds; resnet50 at batch 1 only
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..engine import pruning as engine
from ..engine.cost import count_macs, count_params, measure_latency
from ..engine.graph import find_groups
from ..models.registry import ModelSpec, create_model
from . import common

log = logging.getLogger(__name__)

MODELS = {
    "resnet56": ModelSpec("resnet56", 10, 3, 32),
    "mobilenetv2": ModelSpec("mobilenetv2", 10, 3, 32),
    "resnet50": ModelSpec("torchvision:resnet50", 1000, 3, 224),
}
TARGETS = (0.7, 0.5, 0.3)


def _repeats(model: nn.Module, shape: tuple[int, int, int], batch: int, device: str, budget_s: float) -> int:
    """Timed forwards per round so that one round of one variant takes about ``budget_s``."""
    one = measure_latency(model, shape, batch, device, repeats=1, warmup=1) / 1000.0
    return int(min(20, max(2, budget_s / max(one, 1e-6))))


def time_variants(variants: Sequence[nn.Module], shape: tuple[int, int, int], batch: int, device: str,
                  rounds: int, budget_s: float) -> list[float]:
    """Median ms per variant over interleaved rounds."""
    reps = [_repeats(m, shape, batch, device, budget_s) for m in variants]
    per_round: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, m in enumerate(variants):
            per_round[i].append(measure_latency(m, shape, batch, device, repeats=reps[i], warmup=1))
    return [statistics.median(t) for t in per_round]


def bench_model(name: str, spec: ModelSpec, batches: Sequence[int], rounds: int, budget_s: float,
                gpu: bool) -> list[dict[str, Any]]:
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    torch.manual_seed(0)
    base = create_model(spec).eval()
    groups = find_groups(base, shape)
    variants: list[tuple[float, nn.Module]] = [(1.0, base)]
    for target in TARGETS:
        res = engine.prune(base, "l1", target, input_shape=shape, groups=groups, allocation={"mode": "global"})
        variants.append((target, res.model.eval()))
    macs = [count_macs(m, shape) for _, m in variants]
    params = [count_params(m) for _, m in variants]
    rows: list[dict[str, Any]] = [
        {"model": f"{name} ({spec.image_size})", "target": "base" if t == 1.0 else t, "MACs (M)": mc / 1e6,
         "MACs ratio": mc / macs[0], "params ratio": p / params[0]}
        for (t, _), mc, p in zip(variants, macs, params)]
    devices = [("cpu", "")] + ([("cuda", "GPU ")] if gpu else [])
    for device, label in devices:
        models = [m.to(device) for _, m in variants]
        for batch in batches:
            start = time.perf_counter()
            ms = time_variants(models, shape, batch, device, rounds, budget_s)
            log.info("%s %s batch %d: %s ms (%.0f s)", name, device, batch, ", ".join(f"{x:.2f}" for x in ms),
                     time.perf_counter() - start)
            for row, t in zip(rows, ms):
                row[f"{label}latency b{batch} ms"] = t
                row[f"{label}speedup b{batch}"] = ms[0] / t
        for m in models:
            m.to("cpu")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="models (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per variant per round, sets the repeats (default 1.0; --quick 0.3)")
    p.add_argument("--no-resnet50-b32", action="store_true", help="skip batch 32 for resnet50 (slow on a CPU)")
    args = p.parse_args(argv)
    common.setup(args)
    names = args.models or list(MODELS)
    rounds = args.rounds or (2 if args.quick else 5)
    budget = args.budget or (0.3 if args.quick else 1.0)
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in names:
        skip32 = name == "resnet50" and (args.quick or args.no_resnet50_b32)
        rows += bench_model(name, MODELS[name], (1,) if skip32 else (1, 32), rounds, budget, gpu)
    columns = ["model", "target", "MACs (M)", "MACs ratio", "params ratio", "latency b1 ms", "speedup b1",
               "latency b32 ms", "speedup b32"]
    if gpu:
        columns += ["GPU latency b1 ms", "GPU speedup b1", "GPU latency b32 ms", "GPU speedup b32"]
    notes = (
        (f"CPU latency with {torch.get_num_threads()} torch thread(s), float32, eval mode; median of {rounds} "
        "interleaved rounds, each the median of enough forwards to fill "
        f"~{budget:g} s. speedup = base latency / pruned latency."),
        ("Pruned with autoprune's L1 scores and global allocation to the MACs target (conv + linear MACs "
        "for one sample); the pruned models are physically smaller (channels removed, no masks)."),
        "Random-initialised weights: latency depends only on the layer shapes.",
        "Blank batch-32 cells: skipped (resnet50 at 224 on a CPU is slow; --quick or --no-resnet50-b32).",
        f"Total benchmark time {time.perf_counter() - start:.0f} s.",
    )
    table = common.Table("", "Latency of pruned vs base models", tuple(columns), tuple(rows), notes)
    common.write_tables("latency", [table], args.out, common.command_line("latency", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
