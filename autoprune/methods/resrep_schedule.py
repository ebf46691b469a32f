"""ResRep's mask schedule: which (group, channel) pairs are masked at each training step.

Every update ranks all channels by their scores (compactor row norms, see :func:`rank_scores`) and
masks the weakest prefix that meets the MACs budget, growing by at least ``growth`` channels per
update so that the target is met by ``reach`` of the steps (:class:`MaskSchedule`); the final mask
may be rounded to multiples of ``round_to`` (:func:`round_widths`). Used by
:mod:`autoprune.methods.resrep`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..engine.allocate import AllocationConfig, allocate
from ..engine.cost import WidthCost, WidthObjective
from ..engine.graph import ChannelGroup
from ..errors import AutopruneError

if TYPE_CHECKING:
    from .resrep import ResRepParams

MIN_UPDATES = 8  # aim for this many mask updates between warm-up and reach (fewer if the trial is shorter)


def rank_scores(norms: Mapping[str, torch.Tensor], how: str, cost: WidthCost) -> dict[str, torch.Tensor]:
    """Scores to rank channels by (lower is masked first) from compactor row norms."""
    if how == "raw":
        return dict(norms)
    if how == "group":
        return {g: n / n.mean().clamp_min(1e-12) for g, n in norms.items()}
    per_channel = {g: float(cost.removal_cost(g, {})) for g in norms}  # MACs one channel costs at full width
    mean = sum(per_channel.values()) / max(1, len(per_channel))
    return {g: n * mean / max(per_channel[g], 1.0) for g, n in norms.items()}


class MaskSchedule:
    """Which channels are masked at each step; every update recomputes the mask from scratch."""

    def __init__(self, groups: list[ChannelGroup], bounds: Mapping[str, tuple[int, int]], cost: WidthObjective,
                 target: float, steps: int, params: ResRepParams,
                 allocation: AllocationConfig | None = None) -> None:
        self.groups, self.bounds, self.cost = groups, dict(bounds), cost
        self.budget = target * cost.base  # MACs or latency (any WidthObjective)
        self.params = params
        self.start = min(steps - 1, math.floor(params.warmup * steps)) if steps else 0
        self.reach = max(self.start, math.ceil(params.reach * steps) - 1)
        span = self.reach - self.start
        self.interval = max(1, min(params.mask_interval, span // MIN_UPDATES))
        self.masked: dict[str, set[int]] = {g.name: set() for g in groups}
        self.count = 0
        self.updates = 0
        self.growth_used = 0  # the largest number of channels one update added
        self.reached_at: int | None = None
        # uniform / searched allocation: the widths come from the allocation's shape (they do not
        # depend on scores), the compactor norms only choose which channels of each group go.
        # global: ResRep's own global ranking of compactor norms (``normalise``) sets the widths.
        self.fixed: dict[str, int] | None = None
        if allocation is not None and allocation.mode != "global":
            widths = allocate(groups, None, cost, target, allocation)
            self.fixed = {g.name: g.channels - widths[g.name] for g in groups}

    def forget_fractions(self, lrs: list[float], forget_by: float) -> list[float]:
        """Per step, the fraction of a masked row to remove so that rows reach zero at ``forget_by`` of
        the steps, in proportion to the learning rate (and at once after that step)."""
        end = self.forget_end(len(lrs), forget_by)
        out, left = [1.0] * len(lrs), 0.0
        for t in range(end, -1, -1):
            left += lrs[t]
            out[t] = min(1.0, lrs[t] / left) if left > 0 else 1.0
        return out

    def forget_end(self, steps: int, forget_by: float) -> int:
        """The step after which masked rows are zero (with forced forgetting, ``forget_by`` > 0), or after
        which the mask meets the target (``forget_by`` = 0: rows only shrink under the penalty)."""
        if forget_by <= 0:
            return self.reach
        return min(steps - 1, max(self.reach, math.ceil(forget_by * steps) - 1))

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.interval == 0

    def _order(self, scores: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
        """All maskable (group, channel) pairs, weakest first, leaving every group its minimum width."""
        names = [g.name for g in self.groups]
        flat = torch.cat([scores[n].double().cpu() for n in names])
        owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
        channel = torch.cat([torch.arange(len(scores[n])) for n in names])
        order = torch.sort(flat, stable=True).indices.tolist()
        room = {n: self.bounds[n][1] - self.bounds[n][0] for n in names}
        out = []
        for i in order:
            n = names[int(owner[i])]
            if room[n] > 0:
                room[n] -= 1
                out.append((n, int(channel[i])))
        return out

    def _widths(self, masked: list[tuple[str, int]]) -> dict[str, int]:
        widths = {g.name: g.channels for g in self.groups}
        for n, _ in masked:
            widths[n] -= 1
        return widths

    def _needed(self, order: list[tuple[str, int]]) -> int:
        """Length of the shortest prefix of ``order`` whose masking meets the budget (bisection)."""
        if self.cost.value(self._widths(order)) > self.budget:
            return len(order)
        lo, hi = -1, len(order)  # macs(prefix lo) > budget >= macs(prefix hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost.value(self._widths(order[:mid])) <= self.budget:
                hi = mid
            else:
                lo = mid
        return hi

    def _fixed_order(self, scores: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
        """Channels to mask under a fixed allocation, ordered so that every prefix masks each group
        in proportion to its final share (weakest of each group first)."""
        assert self.fixed is not None
        keyed = []
        for g in self.groups:
            n = self.fixed[g.name]
            weakest = torch.sort(scores[g.name].double().cpu(), stable=True).indices[:n].tolist()
            keyed += [((i + 1) / n, g.name, c) for i, c in enumerate(weakest)]
        return [(name, c) for _, name, c in sorted(keyed, key=lambda t: t[0])]

    def update(self, scores: Mapping[str, torch.Tensor], step: int) -> dict[str, set[int]]:
        if self.fixed is not None:
            order = self._fixed_order(scores)
            needed = len(order)
        else:
            order = self._order(scores)
            needed = self._needed(order)
        left = max(1, (self.reach - step) // self.interval + 1)  # updates until the reach step
        growth = max(self.params.growth, math.ceil((needed - self.count) / left))
        self.growth_used = max(self.growth_used, min(growth, needed - self.count))
        self.count = min(needed, self.count + growth)
        self._set(order[: self.count])
        self.updates += 1
        if self.reached_at is None and self.count >= needed:
            self.reached_at = step
        return self.masked

    def finish(self, scores: Mapping[str, torch.Tensor]) -> dict[str, set[int]]:
        """The final mask: the trained one, extended (weakest first) until it meets the target."""
        chosen = [(n, c) for n, cs in self.masked.items() for c in sorted(cs)]
        if self.fixed is not None:  # the trained mask of each group, extended to the allocated width
            for g in self.groups:
                ranked = torch.sort(scores[g.name].double().cpu(), stable=True).indices.tolist()
                extra = [c for c in ranked if c not in self.masked[g.name]]
                chosen += [(g.name, c) for c in extra[: self.fixed[g.name] - len(self.masked[g.name])]]
            self._set(chosen)
            if self.cost.value(self._widths(chosen)) > self.budget:
                raise AutopruneError("internal: resrep could not meet the target; please report")
            return self.masked
        widths = self._widths(chosen)
        for n, c in self._rest(scores):
            if self.cost.value(widths) <= self.budget:
                break
            if widths[n] > self.bounds[n][0]:
                widths[n] -= 1
                chosen.append((n, c))
        self._set(chosen)
        if self.cost.value(widths) > self.budget:
            raise AutopruneError("internal: resrep could not meet the target; please report")
        return self.masked

    def _rest(self, scores: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
        names = [g.name for g in self.groups]
        pairs = [(float(scores[n][c]), i, c) for i, n in enumerate(names) for c in range(len(scores[n]))
                 if c not in self.masked[n]]
        return [(names[i], c) for _, i, c in sorted(pairs)]

    def _set(self, chosen: list[tuple[str, int]]) -> None:
        self.masked = {g.name: set() for g in self.groups}
        for n, c in chosen:
            self.masked[n].add(c)


def round_widths(masked: dict[str, set[int]], scores: Mapping[str, torch.Tensor], groups: list[ChannelGroup],
                 bounds: Mapping[str, tuple[int, int]], step: int | Mapping[str, int], cost: WidthObjective,
                 budget: float) -> dict[str, set[int]]:
    """Make every width a multiple of ``step`` (allocation ``round_to``) without exceeding the budget:
    round widths down, then give back ``step`` channels (strongest masked first) while the budget allows."""
    masked = {n: set(cs) for n, cs in masked.items()}
    size = {g.name: g.channels for g in groups}
    steps = dict(step) if isinstance(step, Mapping) else {g.name: int(step) for g in groups}

    def strongest_masked(n: str) -> list[int]:
        return sorted(masked[n], key=lambda c: -float(scores[n][c]))

    def weakest_kept(n: str) -> list[int]:
        return sorted((c for c in range(size[n]) if c not in masked[n]), key=lambda c: float(scores[n][c]))

    for n in masked:
        width = size[n] - len(masked[n])
        target = max(bounds[n][0], steps[n] * (width // steps[n])) if width < size[n] else width
        masked[n].update(weakest_kept(n)[: width - target] if width > target else [])
    widths = {n: size[n] - len(cs) for n, cs in masked.items()}
    while True:
        best = None
        for n, cs in masked.items():
            if not cs:
                continue
            trial = dict(widths)
            trial[n] = min(size[n], widths[n] + steps[n])
            if cost.value(trial) <= budget:
                prio = float(scores[n][strongest_masked(n)[0]])
                if best is None or prio > best[0]:
                    best = (prio, n)
        if best is None:
            return masked
        n = best[1]
        for c in strongest_masked(n)[: min(steps[n], len(masked[n]))]:
            masked[n].discard(c)
        widths[n] = size[n] - len(masked[n])
