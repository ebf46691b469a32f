"""What width rounding gains, per runtime: the same uniform prune with widths on and off a multiple of 8.

Part ``align`` of :mod:`.latency_search` (issue 27: "measure what rounding gains on each runtime").
For each model, batch size, thread count and runtime, every prunable channel group keeps
``f`` x its channels (``f`` = 0.75 / 0.5 / 0.3) in three variants: rounded to the nearest multiple of 8
(at least 8; ``r8``), one channel fewer than that (``r8 - 1``: fewer MACs, off the multiple), and
``round(f x c)`` as a uniform prune leaves it (``as is``). Each variant is timed against the base in
its own pair of interleaved rounds (:func:`autoprune.engine.latency_measure.measure_models`), so each
latency fraction is a ratio inside one run.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..engine.cost import count_macs
from ..engine.graph import find_groups
from ..engine.latency import measure_models, pruned_copy
from ..engine.latency_layers import ALIGN
from ..engine.latency_table import LatencyConfig, check_runtime
from ..errors import AutopruneError
from ..models.registry import create_model
from . import common
from .latency import MODELS

log = logging.getLogger(__name__)

FRACTIONS = (0.75, 0.5, 0.3)
VARIANTS = ("as is", "r8", "r8 - 1")


def variant_widths(channels: int, f: float) -> dict[str, int]:
    """Per variant, the width a group of ``channels`` keeps at fraction ``f`` (never above ``channels``)."""
    r8 = min(channels, max(ALIGN, ALIGN * round(f * channels / ALIGN)))
    return {"as is": max(1, round(f * channels)), "r8": r8, "r8 - 1": max(1, r8 - 1)}


def runtimes() -> list[str]:
    """torch, and onnxruntime where the ``export`` extra is installed."""
    out = ["torch"]
    try:
        check_runtime("onnxruntime")
        out.append("onnxruntime")
    except AutopruneError:
        log.info("onnxruntime is not installed: the align part measures PyTorch eager only")
    return out


def align_rows(name: str, batches: Sequence[int], threads_list: Sequence[int], rounds: int,
               clock: Any) -> list[dict[str, Any]]:
    """The rows of one model: per (runtime, batch, threads, fraction), each variant's measured latency
    fraction of the base and MACs fraction. ``clock(threads)`` names the timing clock."""
    spec = MODELS[name]
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    torch.manual_seed(0)
    model = create_model(spec).eval()
    groups = [g for g in find_groups(model, shape) if g.prunable]
    base_macs = count_macs(model, shape)
    copies = {(f, v): pruned_copy(model, groups, {g.name: variant_widths(g.channels, f)[v] for g in groups})
              for f in FRACTIONS for v in VARIANTS}
    macs = {k: count_macs(m, shape) / base_macs for k, m in copies.items()}
    keys = list(copies)
    rows = []
    for runtime in runtimes():
        for batch in batches:
            for threads in threads_list:
                cfg = LatencyConfig(runtime=runtime, batch_size=batch, threads=threads, rounds=rounds, budget_s=0.05,
                                    clock=clock(threads) if runtime == "torch" else "wall")
                ms = measure_models([model, *(copies[k] for k in keys)], shape, cfg, f"align {name} {runtime}")
                lat = {k: t / ms[0] for k, t in zip(keys, ms[1:])}
                for f in FRACTIONS:
                    row = {"model": f"{name} ({spec.image_size})", "runtime": runtime, "batch": batch,
                           "threads": threads, "clock": cfg.clock, "fraction": f, "base ms": ms[0]}
                    for v in VARIANTS:
                        row[f"{v}: lat frac"] = lat[(f, v)]
                        row[f"{v}: MACs frac"] = macs[(f, v)]
                    row["r8 vs as is"] = lat[(f, "as is")] / lat[(f, "r8")]
                    row["r8 vs r8 - 1"] = lat[(f, "r8 - 1")] / lat[(f, "r8")]
                    rows.append(row)
                log.info("align %s %s b%d t%d done", name, runtime, batch, threads)
    return rows


def align_table(rows: Sequence[dict[str, Any]], where: str) -> common.Table:
    cols = ("model", "runtime", "batch", "threads", "clock", "fraction", "base ms",
            *(f"{v}: {c}" for v in VARIANTS for c in ("lat frac", "MACs frac")), "r8 vs as is", "r8 vs r8 - 1")
    notes = (where, ("Uniform prune: every prunable channel group keeps 'fraction' x its channels: 'as is' = "
             "round(fraction x c); 'r8' = the nearest multiple of 8 (at least 8); 'r8 - 1' = one channel fewer "
             "(fewer MACs, off the multiple). 'lat frac': measured latency over the base's, each variant timed "
             "against the base in its own interleaved rounds. 'r8 vs as is' / 'r8 vs r8 - 1': speed-up of the "
             "rounded widths (above 1: rounding is faster)."),
             "onnxruntime rows: wall clock, the session's intra-op threads set to 'threads'.")
    return common.Table("align", "Width rounding: on and off a multiple of 8, per runtime", cols, tuple(rows), notes)
