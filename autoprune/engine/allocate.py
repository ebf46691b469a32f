"""Allocation: turn channel scores, a per-layer ratio shape and a MACs target into widths per group.

Shared by every method (DESIGN.md section 3). Three shapes:

- ``uniform``: every prunable group keeps the same fraction of its channels;
- ``global``: one threshold on per-group-normalised scores across all groups (a channel survives
  if its normalised score is above the threshold), so layers with weak channels lose more;
- ``searched``: keep ratio ``r * multipliers[bucket(depth)]`` (times ``residual_multiplier`` for a
  residual-coupled group), normalised by the largest; the search samples the shape, so only ratios
  between multipliers matter (the search space samples K-1 log-ratios, see
  :mod:`autoprune.search.space`). ``residual_multiplier`` > 1 spares the residual stream, as the
  ResRep and FSM papers do by pruning only internal layers.

Each shape has one free scalar (ratio or threshold) that moves MACs monotonically; we bisect it
with the analytic :class:`~autoprune.engine.cost.WidthCost` (microseconds per evaluation), then fill the
remaining gap channel by channel in priority order. The result is at most the target and, unless
the width granularity forbids it, within 1 % of the base MACs below it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import AutopruneError, UnreachableTarget
from .cost import WidthObjective
from .graph import ChannelGroup
from .latency_layers import round_up

log = logging.getLogger(__name__)

MODES = ("uniform", "global", "searched")
TOLERANCE = 0.01  # of the base MACs: how far below the target an allocation may land
NORMALISATIONS = ("none", "mean", "max")


@dataclass(frozen=True)
class AllocationConfig:
    mode: str = "global"
    multipliers: tuple[float, ...] = ()  # searched mode: one per depth bucket, > 0
    residual_multiplier: float = 1.0  # searched mode: extra factor for residual-coupled groups, > 0
    min_channels: int = 1
    min_ratio: float = 0.05  # never keep fewer than this fraction of a group
    max_prune_ratio: float = 0.95  # never remove more than this fraction of a group
    # widths are multiples of this (8 suits GPUs) unless the group is smaller; "auto": per group, the
    # multiple the latency model found fastest on the device (needs a latency objective)
    round_to: int | str = 1
    normalise: str = "mean"  # global mode: per-group score normalisation

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AutopruneError(f"allocation mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.normalise not in NORMALISATIONS:
            raise AutopruneError(f"allocation normalise {self.normalise!r} is unknown; use one of "
                                 f"{', '.join(NORMALISATIONS)}")
        if self.mode == "searched" and (not self.multipliers or min(self.multipliers) <= 0):
            raise AutopruneError("allocation mode 'searched' needs positive multipliers, one per depth bucket")
        if not self.residual_multiplier > 0:
            raise AutopruneError(f"allocation residual_multiplier must be > 0, got {self.residual_multiplier}")
        if not 0 <= self.min_ratio <= 1 or not 0 <= self.max_prune_ratio < 1:
            raise AutopruneError("allocation min_ratio must be in [0, 1] and max_prune_ratio in [0, 1)")
        if self.min_channels < 1:
            raise AutopruneError("allocation min_channels must be at least 1")
        if self.round_to != "auto" and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                        or self.round_to < 1):
            raise AutopruneError(f"allocation round_to must be a positive integer (1, 8, 16, 32) or auto, "
                                 f"got {self.round_to!r}")


def round_steps(groups: Sequence[ChannelGroup], cfg: AllocationConfig, cost: object = None) -> dict[str, int]:
    """Per group, the multiple its width is rounded to: ``cfg.round_to``, or with ``round_to: auto`` the
    multiple ``cost.round_multiples()`` (a latency model) found fastest for the group's layers.

    Raises ``AutopruneError`` for ``auto`` with a cost that has no such multiples (MACs).
    """
    if cfg.round_to != "auto":
        return {g.name: int(cfg.round_to) for g in groups}
    multiples = getattr(cost, "round_multiples", None)
    if multiples is None:
        raise AutopruneError("allocation round_to auto needs a latency model of the device (--cost latency); "
                             "with MACs use round_to 1, 8, 16 or 32")
    found = multiples()
    return {g.name: max(1, int(found.get(g.name, 1))) for g in groups}


def width_bounds(g: ChannelGroup, cfg: AllocationConfig, step: int | None = None) -> tuple[int, int]:
    """(fewest, most) channels ``g`` may keep under ``cfg`` (minimum width and ratio, rounding to ``step``,
    default ``cfg.round_to``): the fewest is the minimum rounded up, never below it."""
    low = max(cfg.min_channels, math.ceil(cfg.min_ratio * g.channels),
              math.ceil((1 - cfg.max_prune_ratio) * g.channels))
    if step is None:
        step = 1 if cfg.round_to == "auto" else int(cfg.round_to)
    return round_up(min(low, g.channels), step, g.channels), g.channels


def floor_widths(groups: Sequence[ChannelGroup], cfg: AllocationConfig, cost: object = None) -> dict[str, int]:
    """The narrowest widths an allocation under ``cfg`` may give the prunable groups (minimum widths and
    ratio, rounded to their step); ``cost.value`` of them is the fastest reachable cost (the floor)."""
    prunable = [g for g in groups if g.prunable]
    steps = round_steps(prunable, cfg, cost)
    return {g.name: width_bounds(g, cfg, steps[g.name])[0] for g in prunable}


def _normalised(scores: torch.Tensor, how: str) -> torch.Tensor:
    s = scores.detach().double().cpu().clamp_min(0)
    if how == "mean":
        return s / s.mean().clamp_min(1e-12)
    if how == "max":
        return s / s.max().clamp_min(1e-12)
    return s


class _Shape:
    """Widths as a monotone function of one scalar ``x`` in [0, 1]: larger x keeps more channels."""

    def __init__(self, groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor], cfg: AllocationConfig,
                 steps: Mapping[str, int]):
        self.groups, self.cfg, self.steps = groups, cfg, dict(steps)
        self.bounds = {g.name: width_bounds(g, cfg, self.steps[g.name]) for g in groups}
        if cfg.mode == "global":
            self.sorted = {g.name: torch.sort(_normalised(scores[g.name], cfg.normalise), descending=True).values
                           for g in groups}
            top = max((float(s[0]) for s in self.sorted.values()), default=1.0)
            self.top = top if top > 0 else 1.0
        if cfg.mode == "searched":
            k = len(cfg.multipliers)
            self.mult = {g.name: cfg.multipliers[min(k - 1, int(g.depth * k))]
                         * (cfg.residual_multiplier if g.residual else 1.0) for g in groups}
            self.mult_max = max(self.mult.values(), default=1.0)

    def ratio(self, g: ChannelGroup, x: float) -> float:
        if self.cfg.mode == "uniform":
            return x
        if self.cfg.mode == "searched":
            return min(1.0, x * self.mult[g.name] / self.mult_max)
        threshold = (1 - x) * self.top  # global: x=1 keeps everything, x=0 only the best channels
        return float((self.sorted[g.name] >= threshold).sum()) / g.channels

    def widths(self, x: float) -> dict[str, int]:
        out = {}
        for g in self.groups:
            low, high = self.bounds[g.name]
            w = round_up(max(1, math.ceil(self.ratio(g, x) * g.channels - 1e-9)), self.steps[g.name], high)
            out[g.name] = min(high, max(low, w))
        return out

    def priority(self, g: ChannelGroup, width: int) -> float:
        """How much the next channel of ``g`` deserves to be kept (higher first)."""
        if self.cfg.mode == "global":
            s = self.sorted[g.name]
            return float(s[width]) if width < len(s) else -math.inf
        wanted = self.mult[g.name] / self.mult_max if self.cfg.mode == "searched" else 1.0
        return wanted - width / g.channels


def allocate(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor] | None,
    cost: WidthObjective,
    target: float,
    cfg: AllocationConfig | None = None,
) -> dict[str, int]:
    """Channels to keep per prunable group so that cost <= ``target`` x the base's cost, as close as possible.

    ``cost`` is any :class:`~autoprune.engine.cost.WidthObjective`: analytic MACs (:class:`WidthCost`)
    by default, or a latency model of the device.

    ``scores`` maps group name -> per-channel importance (higher keeps); only the ``global`` mode
    reads them. An unreachable target raises ``AutopruneError`` naming the smallest reachable fraction.
    """
    cfg = cfg or AllocationConfig()
    if not 0 < target <= 1:
        raise AutopruneError(f"{cost.unit} target {target} must be a fraction in (0, 1]")
    prunable = [g for g in groups if g.prunable]
    if cfg.mode == "global":
        missing = [g.name for g in prunable if scores is None or g.name not in scores]
        if missing:
            raise AutopruneError(f"global allocation needs scores for every prunable group; missing {missing[0]!r}")
    shape = _Shape(prunable, scores or {}, cfg, round_steps(prunable, cfg, cost))
    budget = target * cost.base
    lowest = floor_widths(prunable, cfg, cost)
    floor = cost.value(lowest)
    if floor > budget:
        reachable = math.ceil(floor / cost.base * 1000) / 1000
        raise UnreachableTarget(
            f"{cost.unit} target {target:.3f} is unreachable: the smallest reachable fraction is "
            f"{reachable:.3f} (min widths, unprunable groups, rounded up); raise the target or lower min_ratio",
            reachable, lowest)
    above = None
    if cost.value(shape.widths(1.0)) <= budget:
        widths = shape.widths(1.0)
    else:
        lo, hi = 0.0, 1.0  # macs(widths(lo)) <= budget < macs(widths(hi)) once lo is valid
        widths = lowest if cost.value(shape.widths(0.0)) > budget else shape.widths(0.0)
        for _ in range(50):
            mid = (lo + hi) / 2
            w = shape.widths(mid)
            if cost.value(w) <= budget:
                lo, widths = mid, w
            else:
                hi = mid
        above = shape.widths(hi)
    widths = _fill(prunable, widths, shape, cost, budget)
    if above is not None and budget - cost.value(widths) > TOLERANCE * cost.base:
        # The scalar jumped over the target: one step of x moved a costly channel (LeNet's conv1 under
        # FSM scores: 3 -> 2 of 6 channels is 15 % of the MACs) and the cheap groups were already full.
        # Come down from the widths just above instead, through the cheap channels.
        down = _fill(prunable, _descend(prunable, above, shape, cost, budget), shape, cost, budget)
        if cost.value(widths) < cost.value(down) <= budget:
            widths = down
    if budget - cost.value(widths) > TOLERANCE * cost.base:
        widths = _swap(prunable, widths, shape, cost, budget)
    frac = cost.value(widths) / cost.base
    if target - frac > TOLERANCE:
        log.warning("allocation reached %.4f of base %s for target %.4f (width granularity)", frac, cost.unit, target)
    return widths


def _fill(groups: list[ChannelGroup], widths: dict[str, int], shape: _Shape, cost: WidthObjective,
          budget: float) -> dict[str, int]:
    """Add channels, best priority first, while MACs stay within budget."""
    widths = dict(widths)
    open_groups = {g.name: g for g in groups if widths[g.name] < g.channels}
    while open_groups:
        g = max(open_groups.values(), key=lambda grp: shape.priority(grp, widths[grp.name]))
        trial = dict(widths)
        trial[g.name] = min(g.channels, widths[g.name] + shape.steps[g.name])
        if cost.value(trial) <= budget:
            widths = trial
            if widths[g.name] >= g.channels:
                del open_groups[g.name]
        else:
            del open_groups[g.name]
    return widths


def _descend(groups: list[ChannelGroup], widths: dict[str, int], shape: _Shape, cost: WidthObjective,
             budget: float) -> dict[str, int]:
    """Remove channels, worst priority first, until MACs are within budget; a channel that costs more
    than the remaining excess (plus the tolerance) is removed only when no cheaper one is left."""
    widths = dict(widths)
    tol = TOLERANCE * cost.base
    now = cost.value(widths)
    while now > budget:
        options = []
        for g in groups:
            low = shape.bounds[g.name][0]
            if widths[g.name] > low:
                trial = dict(widths)
                trial[g.name] = max(low, widths[g.name] - shape.steps[g.name])
                options.append((g, trial, cost.value(trial)))
        if not options:
            break
        cheap = [o for o in options if now - o[2] <= now - budget + tol]
        g, widths, now = min(cheap or options, key=lambda o: shape.priority(o[0], o[1][o[0].name]))
    return widths


def _swap(groups: list[ChannelGroup], widths: dict[str, int], shape: _Shape, cost: WidthObjective, budget: float,
          rounds: int = 32) -> dict[str, int]:
    """Where every group's next channel is too costly (coarse groups, e.g. an SE block's 16 and 32
    channels at 3-6 % of the MACs each), give one channel of a group back and spend what it frees on
    the other groups, while that brings the MACs closer to the budget. Small models only: a large one
    always has a cheap channel left."""
    if len(groups) > 64:
        return widths
    tol = TOLERANCE * cost.base
    now = cost.value(widths)
    for _ in range(rounds):
        if budget - now <= tol:
            break
        best: tuple[int, dict[str, int]] | None = None
        for g in groups:
            low = shape.bounds[g.name][0]
            if widths[g.name] <= low:
                continue
            trial = dict(widths)
            trial[g.name] = max(low, widths[g.name] - shape.steps[g.name])
            others = [h for h in groups if h.name != g.name]
            trial = _fill(groups, _fill(others, trial, shape, cost, budget), shape, cost, budget)
            macs = cost.value(trial)
            if now < macs <= budget and (best is None or macs > best[0]):
                best = (macs, trial)
        if best is None:
            break
        now, widths = best
    return widths


def select(scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Keep the ``widths[g]`` best-scored channels of each group; returns sorted kept indices."""
    keep = {}
    for name, width in widths.items():
        s = scores[name].detach().cpu().double()
        order = torch.sort(s, descending=True, stable=True).indices  # ties: lower index first
        keep[name] = tuple(sorted(int(i) for i in order[: int(width)]))
    return keep
