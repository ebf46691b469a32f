"""One layer's latency table: measured latencies over (input, output) widths, interpolated.

Part of the latency model (:mod:`.latency`, after HALP and NetAdapt). A width is rounded up to the
table's channel block and the table is bilinear between its grid points; a width off a multiple of
``ALIGN`` (8) pays the table's measured misalignment factor on top (the probe's ``w - 1`` against ``w``,
see :func:`misaligned_factor`).
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALIGN = 8  # a width off this multiple pays the table's measured misalignment factor
MISALIGNED_MAX = 1.5  # the factor is clamped to [1, this]; within the measurements' noise it is 1
MISALIGNED_MIN = 1.02  # a smaller median slowdown is taken as none


def round_up(n: int, step: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``step``, never above ``cap`` (the full width); the allocator's
    rounding too."""
    return min(cap, step * math.ceil(n / step))


@dataclass(frozen=True)
class LayerTable:
    """Measured latency (ms) of one block geometry over a grid of (input, output) widths."""

    in_pts: tuple[int, ...]
    out_pts: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]  # ms[i][j]: in_pts[i] inputs, out_pts[j] outputs (monotone)
    block: int  # widths are rounded up to a multiple of this before interpolation
    depthwise: bool = False
    spread: float = 0.0  # median spread of the measurements (rounds' range / median)
    # latency at w - 1 over latency at w (w a multiple of ALIGN), per dimension: the cost of a width off
    # the multiple of ALIGN beyond rounding up to the block (1.0: none measured)
    misaligned_in: float = 1.0
    misaligned_out: float = 1.0

    def at(self, cin: int, cout: int) -> float:
        if self.depthwise:
            cin = cout = min(cin, cout)
        ms = _bilinear(self.in_pts, self.out_pts, self.ms, round_up(cin, self.block, self.in_pts[-1]),
                       round_up(cout, self.block, self.out_pts[-1]))
        if _off(cout, self.out_pts[-1], self.block):
            ms *= self.misaligned_out
        if not self.depthwise and _off(cin, self.in_pts[-1], self.block):
            ms *= self.misaligned_in
        return ms

    def to_dict(self) -> dict[str, Any]:
        return {"in": list(self.in_pts), "out": list(self.out_pts), "ms": [list(r) for r in self.ms],
                "block": self.block, "depthwise": self.depthwise, "spread": self.spread,
                "misaligned_in": self.misaligned_in, "misaligned_out": self.misaligned_out}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerTable:
        return cls(tuple(int(v) for v in d["in"]), tuple(int(v) for v in d["out"]),
                   tuple(tuple(float(v) for v in r) for r in d["ms"]), int(d["block"]), bool(d["depthwise"]),
                   float(d.get("spread", 0.0)), float(d.get("misaligned_in", 1.0)),
                   float(d.get("misaligned_out", 1.0)))


def _off(c: int, full: int, block: int) -> bool:
    """Whether width ``c`` pays the misalignment factor: off the multiple of ALIGN, unless it rounds up to
    a full width that is itself off it (the table measured that width as it is)."""
    if c % ALIGN == 0:
        return False
    return not (full % ALIGN and round_up(c, block, full) == full)


def misaligned_factor(rounds: Mapping[int, Sequence[float]], w: int) -> float:
    """The misalignment factor from interleaved rounds: the median over rounds of ms[w - 1] / ms[w] (paired
    within a round, so a machine that slows down between rounds does not move it), clamped to
    [1, MISALIGNED_MAX]; 1 unless it is above MISALIGNED_MIN and at least 80 % of the rounds agree."""
    if w % ALIGN or (w - 1) not in rounds or w not in rounds:
        return 1.0
    ratios = [a / b for a, b in zip(rounds[w - 1], rounds[w]) if b > 0]
    if not ratios:
        return 1.0
    r = statistics.median(ratios)
    agree = sum(x > 1.0 for x in ratios) / len(ratios)
    return min(r, MISALIGNED_MAX) if r > MISALIGNED_MIN and agree >= 0.8 else 1.0


def _interp_axis(pts: Sequence[int], x: float) -> tuple[int, int, float]:
    if len(pts) == 1 or x <= pts[0]:
        return 0, 0, 0.0
    if x >= pts[-1]:
        return len(pts) - 1, len(pts) - 1, 0.0
    j = bisect.bisect_right(pts, x)
    i = j - 1
    return i, j, (x - pts[i]) / (pts[j] - pts[i])


def _bilinear(xs: Sequence[int], ys: Sequence[int], v: Sequence[Sequence[float]], x: float, y: float) -> float:
    i0, i1, tx = _interp_axis(xs, x)
    j0, j1, ty = _interp_axis(ys, y)
    top = v[i0][j0] * (1 - ty) + v[i0][j1] * ty
    bottom = v[i1][j0] * (1 - ty) + v[i1][j1] * ty
    return top * (1 - tx) + bottom * tx
