"""A latency model of the device: predicted latency of any width assignment, measured once per machine.

The engine's second cost model (DESIGN.md section 7, "Latency as a target"), after HALP (Shen et al.,
NeurIPS 2022; NVlabs/HALP: a per-layer latency lookup table measured on the target device, pruning
under a latency budget) and NetAdapt (Yang et al., ECCV 2018: empirical measurements, not proxies).

For each conv / linear layer (with the BatchNorm and activation that follow it; see
:func:`~.latency_table.layer_blocks`) a small table of measured latencies over (input, output) widths
is built on this machine, for one runtime, batch size and thread count; layers of equal geometry
share a table. Kernels work on blocks of channels (oneDNN on AVX-512: 16 floats), so latency is a
step function of width: a probe per table finds the block ``B`` (the smallest multiple of 1 / 8 / 16
/ 32 whose removal saves latency in proportion), the grid is measured at multiples of ``B`` and a
width is rounded up to its block before bilinear interpolation. A width that is not a multiple of 8
runs a slower kernel path on top of that (a pruned MobileNetV2 at 8k - 1 channels everywhere measured
5-21 % slower than at 8k in PyTorch eager and 2.1-2.8x in ONNX Runtime, with fewer MACs; the ``align``
part of :mod:`autoprune.benchmarks.latency_search`): the probe also times ``w - 1`` against ``w`` for each
varying dimension, and that ratio multiplies a layer's latency when its width in that dimension is
off the multiple of 8. The predicted latency of a width
assignment is ``scale x sum(layer latencies) + const``, where ``scale`` and ``const`` (the unpruned
rest: pooling, additions, framework overhead) are fitted to the measured end-to-end latency of a
few uniformly pruned copies of the model, each timed against the unpruned one in its own pair
(:mod:`.latency_measure`). :class:`LatencyModel` implements
:class:`~.cost.WidthObjective` (unit "latency", in ms), so the shared allocator hits a latency
target with any method. :func:`autoprune.engine.latency_validate.validate` measures its error on
random held-out width assignments.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import progress
from .cost import WidthCost
from .graph import ChannelGroup
from .latency_layers import ALIGN, LayerTable, misaligned_factor, round_up
from .latency_measure import measure_models
from .latency_table import (
    BlockGeom,
    LatencyConfig,
    Timing,
    cache_key,
    device_name,
    layer_blocks,
    load_cached,
    make_runner,
    save_cached,
    time_runners,
)

log = logging.getLogger(__name__)

PROBE_MULTIPLES = (1, 8, 16, 32)
CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.3)  # uniform width fractions fitting scale and const


class LatencyModel:
    """Predicted latency (ms per batch) of a width assignment: a :class:`~.cost.WidthObjective`.

    ``value(widths)`` = ``scale`` x the sum of per-layer table latencies + ``const``; ``base`` is the
    prediction for the unpruned model, ``measured_base_ms`` its measured latency. ``info`` records the
    device name, runtime, threads and batch size it was measured with.
    """

    unit = "latency"

    def __init__(self, cost: WidthCost, layers: Mapping[str, Sequence[str]], tables: Mapping[str, LayerTable],
                 scale: float, const: float, measured_base_ms: float, info: Mapping[str, Any],
                 multiples: Mapping[str, int]) -> None:
        self.cost = cost
        self.layers = {n: tuple(ks) for n, ks in layers.items()}  # layer name -> table keys, one per call
        self.tables = dict(tables)
        self.scale, self.const = float(scale), float(const)
        self.measured_base_ms = float(measured_base_ms)
        self.info = dict(info)
        self.multiples = dict(multiples)  # group -> the fastest multiple the probes found (round_to auto)
        self._base = self.value({})

    @property
    def base(self) -> float:
        return self._base

    def layer_ms(self, widths: Mapping[str, int]) -> dict[str, float]:
        """Per layer, its table latency (ms, before ``scale``) at ``widths``."""
        shapes = self.cost.layer_shapes(widths)
        return {n: sum(self.tables[k].at(*shapes[n]) for k in keys) for n, keys in self.layers.items()}

    def value(self, widths: Mapping[str, int]) -> float:
        """Predicted ms per forward of a ``batch_size`` batch when the groups keep ``widths`` channels."""
        return self.scale * sum(self.layer_ms(widths).values()) + self.const

    def fraction(self, widths: Mapping[str, int]) -> float:
        return self.value(widths) / self.base

    def round_multiples(self) -> dict[str, int]:
        """Per group, the width multiple ``round_to: auto`` uses."""
        return dict(self.multiples)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {n: list(ks) for n, ks in self.layers.items()},
                "tables": {k: t.to_dict() for k, t in self.tables.items()}, "scale": self.scale,
                "const": self.const, "measured_base_ms": self.measured_base_ms, "info": self.info,
                "multiples": self.multiples}


# --------------------------------------------------------------------------- building


def structure_hash(blocks: Mapping[str, Sequence[BlockGeom]], groups: Sequence[ChannelGroup]) -> str:
    """A digest of the model's measured structure: every layer's block geometry and the channel groups."""
    data = {"blocks": {n: [b.key() for b in bs] for n, bs in sorted(blocks.items())},
            "groups": [[g.name, g.channels, g.prunable, sorted(m.module + ":" + m.dim for m in g.members)]
                       for g in groups]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def lowest_widths(groups: Sequence[ChannelGroup]) -> dict[str, int]:
    """The narrowest widths the table must cover: 5 % of each prunable group, at least 1 channel."""
    return {g.name: max(1, math.ceil(0.05 * g.channels)) for g in groups if g.prunable}


def _ranges(cost: WidthCost, blocks: Mapping[str, Sequence[BlockGeom]],
            groups: Sequence[ChannelGroup]) -> dict[str, tuple[BlockGeom, int, int]]:
    """Per distinct block key: (geometry, lowest input width, lowest output width) over the layers."""
    lo = cost.layer_shapes(lowest_widths(groups))
    out: dict[str, tuple[BlockGeom, int, int]] = {}
    for name, bs in blocks.items():
        lin, lout = lo.get(name, (bs[0].in_ch, bs[0].out_ch))
        for b in bs:
            k = b.key()
            prev = out.get(k, (b, b.in_ch, b.out_ch))
            out[k] = (b, min(prev[1], lin), min(prev[2], lout))
    return out


def _probe_points(b: BlockGeom, dim: str) -> tuple[int, list[int]]:
    """(reference width w, widths to measure: w and w - m for the candidate multiples m < M)."""
    c = b.out_ch if dim == "out" else b.in_ch
    big = [m for m in (32, 16, 8) if 2 * m <= c]
    if not big:
        return c, []
    top = big[0]
    w = top * min(4, c // top)
    return w, [w] + [w - m for m in PROBE_MULTIPLES if m <= top]


def _block_from_probe(w: int, ms: Mapping[int, float]) -> int:
    """The smallest multiple m whose removal (w -> w - m) saves at least half the latency that
    proportional scaling of the largest probed multiple's saving predicts."""
    top = max(w - x for x in ms if x < w)
    full = ms[w]
    drop_top = (full - ms[w - top]) / full
    if drop_top <= 0.02:  # no measurable change: the layer is too small to tell
        return 1
    for m in sorted(w - x for x in ms if x < w):
        if (full - ms[w - m]) / full >= 0.5 * drop_top * m / top:
            return m
    return top


def _axis(full: int, lo: int, block: int, points: int, varies: bool) -> tuple[int, ...]:
    if not varies:
        return (full,)
    lo = round_up(max(1, lo), block, full)
    pts = {full, lo} | {round_up(round(lo + (full - lo) * i / (points - 1)), block, full) for i in range(points)}
    return tuple(sorted(pts))


def _runner(b: BlockGeom, cin: int, cout: int, cfg: LatencyConfig) -> Callable[[], Any]:
    if b.groups > 1 and not b.depthwise:  # a grouped conv keeps its groups: widths in multiples of them
        cin, cout = round_up(cin, b.groups, 10**9), round_up(cout, b.groups, 10**9)
    torch.manual_seed(0)
    module, shape = b.build(cin, cout)
    return make_runner(module, shape, cfg)


def _measure(points: list[tuple[BlockGeom, int, int]], cfg: LatencyConfig, name: str) -> list[Timing]:
    runners = [_runner(b, i, o, cfg) for b, i, o in points]
    with progress.phase(name, total=cfg.rounds, unit="round") as p:
        return time_runners(runners, cfg, on_round=p.advance)


def _tables(ranges: Mapping[str, tuple[BlockGeom, int, int]], cfg: LatencyConfig) -> dict[str, LayerTable]:
    """Probe each geometry's block and misalignment, then measure its grid (both in interleaved rounds).

    The block comes from the first varying dimension (output, else input); a misalignment factor from
    each varying dimension (``w - 1`` against ``w``).
    """
    probes: list[tuple[str, str, int, list[int]]] = []  # (table key, dim, reference width, widths)
    for k, (b, lin, lout) in ranges.items():
        dims = [d for d, low, full in (("out", lout, b.out_ch), ("in", lin, b.in_ch)) if low < full]
        for d in dims[:1] if b.depthwise else dims:
            w, pts = _probe_points(b, d)
            if not pts:
                continue
            if any(p[0] == k for p in probes):  # the block is probed once: here only the misalignment
                pts = [w, w - 1]
            probes.append((k, d, w, pts))
    flat = []
    for k, dim, _, pts in probes:
        b = ranges[k][0]
        # a depthwise conv has one width (in = out): both must move, or every probe builds the full layer
        flat += [(b, x, x) if b.depthwise else (b, b.in_ch, x) if dim == "out" else (b, x, b.out_ch) for x in pts]
    timed = _measure(flat, cfg, "latency probes") if flat else []
    blocks: dict[str, int] = {}
    odd: dict[tuple[str, str], float] = {}
    i = 0
    for k, dim, w, pts in probes:
        got = dict(zip(pts, timed[i:i + len(pts)]))
        i += len(pts)
        if k not in blocks:
            blocks[k] = _block_from_probe(w, {x: t.ms for x, t in got.items()})
        odd[(k, dim)] = misaligned_factor({x: t.rounds for x, t in got.items()}, w)
    grid: list[tuple[str, int, int]] = []
    axes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for k, (b, lin, lout) in ranges.items():
        blk = blocks.get(k, 1)
        # where a dimension pays the misalignment factor, its grid stays on multiples of ALIGN: a grid
        # point off them would already hold the slow path, and at() would charge it twice
        step = {d: max(blk, ALIGN) if odd.get((k, d), 1.0) > 1.0 else blk for d in ("in", "out")}
        outs = _axis(b.out_ch, lout, step["out"], cfg.points, lout < b.out_ch)
        ins = outs if b.depthwise else _axis(b.in_ch, lin, step["in"], cfg.points, lin < b.in_ch)
        axes[k] = (ins, outs)
        grid += [(k, ci, co) for ci in ins for co in outs if not b.depthwise or ci == co]
    timed = _measure([(ranges[k][0], ci, co) for k, ci, co in grid], cfg, "latency table")
    found = {(k, ci, co): (t.ms, t.spread) for (k, ci, co), t in zip(grid, timed)}
    tables = {}
    for k, (ins, outs) in axes.items():
        dw = ranges[k][0].depthwise
        vals = [[found[(k, ci, ci if dw else co)][0] for co in outs] for ci in ins]
        for r in range(len(ins)):  # monotone non-decreasing in both widths (noise must not invert order)
            for c in range(len(outs)):
                vals[r][c] = max([vals[r][c]] + ([vals[r - 1][c]] if r else []) + ([vals[r][c - 1]] if c else []))
        spread = statistics.median(found[(k, ci, ci if dw else co)][1] for ci in ins for co in outs)
        out_odd = odd.get((k, "out"), odd.get((k, "in"), 1.0) if dw else 1.0)
        tables[k] = LayerTable(ins, outs, tuple(tuple(r) for r in vals), blocks.get(k, 1), dw, spread,
                               odd.get((k, "in"), 1.0), out_odd)
    return tables


def pruned_copy(model: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` whose groups keep their first ``widths[g]`` channels (for timing only)."""
    from .plan import Plan, apply_plan
    from .trace import safe_copy

    keep = {n: tuple(range(int(w))) for n, w in widths.items()}
    copy = safe_copy(model).cpu().eval()
    return apply_plan(copy, list(groups), Plan.from_keep(keep, list(groups))).eval()


def uniform_widths(groups: Sequence[ChannelGroup], fraction: float) -> dict[str, int]:
    return {g.name: max(1, round(fraction * g.channels)) for g in groups if g.prunable}


def _fit(sums: Sequence[float], e2e: Sequence[float]) -> tuple[float, float]:
    """Least squares ``e2e = scale x sum + const``. Where that scale falls outside [0.5, 2] (a few noisy
    points, or tables timed per layer far slower than the layers run inside the model) the line is kept
    only with a positive scale and ``const`` >= 0 (a fixed part of the model's time, as the layers the
    tables leave out); else the least squares through the origin (``const`` 0), so a narrow model is
    never predicted near zero.

    Until 2026-12-07 the fallback was scale 1 and the mean gap: MobileNetV2 at batch 32 and 2 threads got
    ``const`` -70 ms on a 282 ms base and a 57 % median error on the fraction of the base; through the
    origin it read 40 %."""
    n = len(sums)
    mx, my = sum(sums) / n, sum(e2e) / n
    var = sum((x - mx) ** 2 for x in sums)
    scale = sum((x - mx) * (y - my) for x, y in zip(sums, e2e)) / var if var > 0 else 1.0
    if 0.5 <= scale <= 2.0 or (scale > 0 and my - scale * mx >= 0):
        return scale, my - scale * mx
    sq = sum(x * x for x in sums)
    return (sum(x * y for x, y in zip(sums, e2e)) / sq if sq > 0 else 1.0), 0.0


def build_latency_model(model: nn.Module, groups: Sequence[ChannelGroup], input_shape: Sequence[int],
                        cfg: LatencyConfig | None = None, cost: WidthCost | None = None) -> LatencyModel:
    """Measure (or load from the cache) the latency model of ``model`` on this machine under ``cfg``.

    Takes seconds (CIFAR ResNet-56, batch 1) to minutes (ResNet-50 at 224, batch 32) the first time;
    announces its phases through :mod:`autoprune.progress`. Raises ``AutopruneError`` for a bad
    ``cfg`` (see :class:`~.latency_table.LatencyConfig`).
    """
    from .graph import build_width_cost

    cfg = cfg or LatencyConfig()
    work = model.eval()
    cost = cost or build_width_cost(work, list(groups), tuple(input_shape))
    blocks = layer_blocks(work, tuple(input_shape))
    key = cache_key(cfg, input_shape, structure_hash(blocks, groups))
    layers = {n: [b.key() for b in bs] for n, bs in blocks.items() if n in cost.layers}
    cached = load_cached(cfg, key)
    if cached is not None:
        log.info("latency model from the cache (%s, %s, batch %d, %d threads)", key["device_name"], cfg.runtime,
                 cfg.batch_size, cfg.n_threads)
        tables = {k: LayerTable.from_dict(t) for k, t in cached["tables"].items()}
        return LatencyModel(cost, layers, tables, cached["scale"], cached["const"], cached["measured_base_ms"],
                            {**cached["info"], "from_cache": True}, cached["multiples"])
    start = time.perf_counter()
    tables = _tables(_ranges(cost, blocks, groups), cfg)
    calib = [uniform_widths(groups, f) for f in CALIBRATION_FRACTIONS]
    e2e = measure_models([pruned_copy(work, groups, w) for w in calib], input_shape, cfg, "latency end-to-end fit")
    probe = LatencyModel(cost, layers, tables, 1.0, 0.0, e2e[0], {}, {})
    scale, const = _fit([probe.value(w) for w in calib], e2e)
    multiples = _group_multiples(groups, blocks, tables)
    info = {"device_name": key["device_name"], "runtime": cfg.runtime, "device": key["device"],
            "threads": cfg.n_threads, "batch_size": int(cfg.batch_size), "input_shape": list(input_shape),
            "tables": len(tables), "layers": len(layers), "measure_s": round(time.perf_counter() - start, 1),
            "spread": statistics.median(t.spread for t in tables.values()) if tables else 0.0,
            "calibration_ms": e2e, "from_cache": False}
    lm = LatencyModel(cost, layers, tables, scale, const, e2e[0], info, multiples)
    save_cached(cfg, key, lm.to_dict())
    return lm


def _refitted(lm: LatencyModel, groups: Sequence[ChannelGroup], tables: Mapping[str, LayerTable],
              fit: Callable[[Sequence[float], Sequence[float]], tuple[float, float]]) -> LatencyModel:
    """``lm`` with ``tables`` and ``scale`` / ``const`` from ``fit`` on the calibration timings it was built
    with (``lm`` unchanged but for the tables when it has none, e.g. a hand-made model)."""
    e2e = lm.info.get("calibration_ms")
    scale, const = lm.scale, lm.const
    if e2e:
        plain = LatencyModel(lm.cost, lm.layers, tables, 1.0, 0.0, lm.measured_base_ms, lm.info, lm.multiples)
        scale, const = fit([plain.value(uniform_widths(groups, f)) for f in CALIBRATION_FRACTIONS], e2e)
    return LatencyModel(lm.cost, lm.layers, tables, scale, const, lm.measured_base_ms, lm.info, lm.multiples)


def without_misalignment(lm: LatencyModel, groups: Sequence[ChannelGroup]) -> LatencyModel:
    """``lm`` with every misalignment factor set to 1 and ``scale`` / ``const`` refitted to the same
    calibration measurements: the latency model as it was before the factors (an ablation)."""
    tables = {k: replace(t, misaligned_in=1.0, misaligned_out=1.0) for k, t in lm.tables.items()}
    return _refitted(lm, groups, tables, _fit)


def _fit_through_first(sums: Sequence[float], e2e: Sequence[float]) -> tuple[float, float]:
    """The line through the first point (the base) with its slope by least squares on the others; through
    the base and the origin where that line would go negative."""
    x0, y0 = sums[0], e2e[0]
    den = sum((x - x0) ** 2 for x in sums[1:])
    scale = sum((x - x0) * (y - y0) for x, y in zip(sums[1:], e2e[1:])) / den if den > 0 else 1.0
    if scale <= 0 or y0 - scale * x0 < 0:
        scale = y0 / x0 if x0 > 0 else 1.0
    return scale, y0 - scale * x0


def through_base(lm: LatencyModel, groups: Sequence[ChannelGroup]) -> LatencyModel:
    """``lm`` with ``scale`` / ``const`` refitted so the line passes through the measured base (the
    first calibration point) and takes its slope by least squares on the narrower calibration points:
    the predicted fraction of the base then has the measured base as its denominator (an ablation,
    ``latency_search``'s 'through base' columns; the default fit is :func:`_fit`)."""
    return _refitted(lm, groups, lm.tables, _fit_through_first) if lm.info.get("calibration_ms") else lm


def _group_multiples(groups: Sequence[ChannelGroup], blocks: Mapping[str, Sequence[BlockGeom]],
                     tables: Mapping[str, LayerTable]) -> dict[str, int]:
    """Per prunable group, the largest block of the layers that produce its channels (its leaders)."""
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        found = [tables[b.key()].block for n in g.leaders for b in blocks.get(n, ()) if b.key() in tables]
        out[g.name] = min(g.channels, max(found, default=1))
    return out


def describe(lm: LatencyModel) -> str:
    """One line: where and how the model was measured."""
    i = lm.info
    return (f"{i.get('runtime')} on {i.get('device_name')}, batch {i.get('batch_size')}, {i.get('threads')} "
            f"thread(s): base {lm.measured_base_ms:.3f} ms measured, {lm.base:.3f} ms predicted")


__all__ = ["LatencyConfig", "LatencyModel", "LayerTable", "build_latency_model", "describe", "device_name",
           "measure_models", "pruned_copy", "uniform_widths", "without_misalignment"]
