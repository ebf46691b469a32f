"""ResRep's mask schedule: which (group, channel) pairs are masked at each training step.

Widths come from the shared allocator (:func:`autoprune.engine.allocate.allocate`) like every other
method's: under ``global`` allocation its scores are the compactor row norms (times the prior, see
:func:`rank_scores`), with the allocation's normalisation, ``round_to`` and the give-back of cheap
channels while under budget, against whatever :class:`~autoprune.engine.cost.WidthObjective` the
context gives (MACs or a latency model); under ``uniform`` / ``searched`` the widths are fixed once
and the norms only choose the channels. Each group masks its weakest channels.

:class:`MaskSchedule` grows the mask on the way there: every update recomputes the target mask from
the current scores and masks a prefix of it (each group in proportion to its final share), growing by
at least ``growth`` channels per update so that the target is met by ``reach`` of the steps. Once the
mask meets the target and its rows have been driven to zero (``forget_by``) it can no longer change,
and it is no longer recomputed (no host synchronisation after that). Used by
:mod:`autoprune.methods.resrep`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch

from ..engine.allocate import AllocationConfig, allocate
from ..engine.cost import WidthObjective
from ..engine.graph import ChannelGroup


class ScheduleParams(Protocol):
    """The schedule's knobs (fractions of the training steps; see :class:`~.resrep.ResRepParams`)."""

    warmup: float
    reach: float
    mask_interval: int
    growth: int
    forget_by: float

MIN_UPDATES = 8  # aim for this many mask updates between warm-up and reach (fewer if the trial is shorter)
Mask = dict[str, set[int]]


def rank_scores(norms: Mapping[str, torch.Tensor], how: str, objective: WidthObjective,
                channels: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """ResRep's own weighting of row norms before the allocator (lower is masked first): ``raw``,
    ``group`` (divided by the group's mean) or ``mac`` (divided by what one channel of the group
    costs in ``objective`` at full width, relative to the mean such cost)."""
    if how == "raw":
        return dict(norms)
    if how == "group":
        return {g: n / n.mean().clamp_min(1e-12) for g, n in norms.items()}
    full = objective.value({})
    per_channel = {g: full - objective.value({g: channels[g] - 1}) for g in norms}
    mean = sum(per_channel.values()) / max(1, len(per_channel))
    return {g: n * mean / max(per_channel[g], 1e-12) for g, n in norms.items()}


class MaskSchedule:
    """Which channels are masked at each step (see the module docstring)."""

    def __init__(self, groups: list[ChannelGroup], objective: WidthObjective, target: float, steps: int,
                 params: ScheduleParams, allocation: AllocationConfig, start_scores: Mapping[str, torch.Tensor]) -> None:
        self.groups, self.objective, self.target = groups, objective, target
        self.allocation, self.params = allocation, params
        self.start = min(steps - 1, math.floor(params.warmup * steps)) if steps else 0
        self.reach = max(self.start, math.ceil(params.reach * steps) - 1)
        self.interval = max(1, min(params.mask_interval, (self.reach - self.start) // MIN_UPDATES))
        self.settle = self._settle(steps, params.forget_by)
        self.masked: Mask = {g.name: set() for g in groups}
        self.count = 0
        self.updates = 0
        self.growth_used = 0  # the largest number of channels one update added
        self.reached_at: int | None = None
        # uniform / searched: widths from the allocation's shape, fixed; global: from the scores
        self.fixed: dict[str, int] | None = None
        if allocation.mode != "global":
            self.fixed = allocate(groups, None, objective, target, allocation)
        else:  # fails early (before any training) when the target is unreachable
            allocate(groups, start_scores, objective, target, allocation)

    def _settle(self, steps: int, forget_by: float) -> int:
        """The step after which the mask cannot change: masked rows are zero (forced forgetting), so
        they rank weakest whatever training does; without forced forgetting, never (the last step)."""
        if forget_by <= 0 or not steps:
            return steps
        return min(steps - 1, max(self.reach, math.ceil(forget_by * steps) - 1))

    def forget_fractions(self, lrs: list[float]) -> list[float]:
        """Per step, the fraction of a masked row to remove so that rows reach zero at ``forget_by`` of
        the steps, in proportion to the learning rate (and at once after that step)."""
        out, left = [1.0] * len(lrs), 0.0
        for t in range(min(self.settle, len(lrs) - 1), -1, -1):
            left += lrs[t]
            out[t] = min(1.0, lrs[t] / left) if left > 0 else 1.0
        return out

    def due(self, step: int) -> bool:
        """Whether step updates the mask: on the interval after warm-up, until the mask is final."""
        if step < self.start or (step - self.start) % self.interval:
            return False
        return self.reached_at is None or step <= self.settle

    def final_after(self, step: int) -> bool:
        """Whether the mask is final after ``step`` (met the target, rows settled at zero)."""
        return self.reached_at is not None and step >= self.settle

    def target_mask(self, scores: Mapping[str, torch.Tensor], keep_masked: bool = False) -> list[tuple[str, int]]:
        """The channels to mask to meet the target, ordered so that every prefix masks each group in
        proportion to its final share (weakest of each group first). ``keep_masked``: channels masked
        now rank weakest (the trained mask is extended, not replaced)."""
        if keep_masked:
            scores = {n: _zeroed(s, self.masked[n]) for n, s in scores.items()}
        widths = self.fixed or allocate(self.groups, scores, self.objective, self.target, self.allocation)
        keyed = []
        for g in self.groups:
            n = g.channels - widths[g.name]
            weakest = torch.sort(scores[g.name].double().cpu(), stable=True).indices[:n].tolist()
            keyed += [((i + 1) / n, g.name, c) for i, c in enumerate(weakest)]
        return [(name, c) for _, name, c in sorted(keyed, key=lambda t: t[0])]

    def update(self, scores: Mapping[str, torch.Tensor], step: int) -> Mask:
        order = self.target_mask(scores)
        needed = len(order)
        left = max(1, (self.reach - step) // self.interval + 1)  # updates until the reach step
        growth = max(self.params.growth, math.ceil((needed - self.count) / left))
        self.growth_used = max(self.growth_used, min(growth, needed - self.count))
        self.count = min(needed, self.count + growth)
        self.masked = _as_mask(self.groups, order[: self.count])
        self.updates += 1
        if self.reached_at is None and self.count >= needed:
            self.reached_at = step
        return self.masked

    def final(self, scores: Mapping[str, torch.Tensor]) -> Mask:
        """The mask this run returns if it ends now: the trained one once complete, else the trained
        one extended (weakest first) until it meets the target. Does not change the schedule."""
        if self.reached_at is not None:
            return {n: set(cs) for n, cs in self.masked.items()}
        return _as_mask(self.groups, self.target_mask(scores, keep_masked=True))


def _zeroed(s: torch.Tensor, masked: set[int]) -> torch.Tensor:
    s = s.detach().double().cpu().clone()
    if masked:
        s[sorted(masked)] = 0.0
    return s


def _as_mask(groups: list[ChannelGroup], chosen: list[tuple[str, int]]) -> Mask:
    out: Mask = {g.name: set() for g in groups}
    for n, c in chosen:
        out[n].add(c)
    return out
