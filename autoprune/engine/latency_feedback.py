"""Closing a latency allocation on measurement: the target is met on the device, not only in the model.

The latency model (:mod:`.latency`) predicts a width assignment's latency to about 7-22 % on a CPU
(``results/benchmarks/latency_search_quiet_*``), while a user asks for, and the issue's band checks,
the *measured* fraction ``[target - 0.05, target + 0.03]``. After NetAdapt (Yang et al., ECCV 2018:
empirical measurements in the loop, not proxies), :class:`LatencyFeedback` allocates with the
model, times the resulting widths interleaved with the base on this device, and when the measured
fraction is outside the acceptance band re-aims the allocation by the measured-to-aimed ratio
(``aim <- aim x centre / measured``, a multiplicative secant step), at most ``rounds`` allocations.
It returns the aim whose widths measured closest to the band, so every method (including ResRep's
mask schedule, which takes the aim as its target) allocates to a corrected target. A target below the
model's floor (the narrowest allowed widths) is not refused on the model's word: those widths are timed
first, and only a floor measured above the band is refused.

Timing copies keep the first ``w`` channels of each group (:func:`.latency.pruned_copy`): latency
depends on the widths, not on which channels are kept.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import AutopruneError, UnreachableTarget, warn
from .graph import ChannelGroup
from .latency_table import LatencyConfig

log = logging.getLogger(__name__)

BELOW, ABOVE = 0.04, 0.02  # accept a measured fraction in [target - BELOW, target + ABOVE] (inside the
# issue's [-0.05, +0.03] band, leaving a point each side for the timing noise of the final reading)
MIN_STEP = 0.002  # a re-aim closer than this to an aim already measured stops the loop


@dataclass(frozen=True)
class FeedbackRound:
    """One measured allocation: the latency-model fraction it aimed at and the fraction measured."""

    aim: float
    measured: float

    def miss(self, target: float) -> float:
        """How far the measurement lies outside ``[target - BELOW, target + ABOVE]`` (0 inside)."""
        return max(0.0, target - BELOW - self.measured, self.measured - target - ABOVE)


class LatencyFeedback:
    """Re-aims a latency allocation until its measured latency fraction is in band.

    ``measure(widths)`` returns the measured latency of a copy pruned to ``widths`` as a fraction of
    the base's (timed interleaved with the base, so drift of a shared machine cancels); ``rounds`` is
    the most allocations measured (1: measure once and keep it). Use :meth:`timing` for the usual
    measurement on this device. Raises ``AutopruneError`` for ``rounds`` < 1.
    """

    def __init__(self, measure: Callable[[Mapping[str, int]], float], rounds: int = 3) -> None:
        if int(rounds) < 1:
            raise AutopruneError(f"latency feedback rounds must be at least 1, got {rounds} (0 means no feedback: "
                                 "pass no LatencyFeedback)")
        self.measure, self.rounds = measure, int(rounds)

    @classmethod
    def timing(cls, model: nn.Module, groups: Sequence[ChannelGroup], input_shape: Sequence[int],
               cfg: LatencyConfig, rounds: int = 3,
               guard: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
               ) -> LatencyFeedback:
        """Feedback that times ``model`` and pruned copies of it under ``cfg`` (:func:`.latency.measure_models`;
        ``prune`` never changes its input model, so none is copied up front); ``guard()`` wraps each
        measurement (a search pauses its other workers there)."""
        from .latency import measure_models, pruned_copy

        shape = tuple(input_shape)

        def measure(widths: Mapping[str, int]) -> float:
            pruned = pruned_copy(model, groups, widths)
            with guard():
                base_ms, ms = measure_models([model, pruned], shape, cfg, "latency feedback")
            return ms / base_ms

        return cls(measure, rounds)

    def aim(self, target: float, allocate: Callable[[float], Mapping[str, int]]) -> tuple[float, list[FeedbackRound]]:
        """The fraction to give the allocator so that ``allocate(aim)``'s widths measure at ``target``.

        ``allocate(fraction)`` returns widths meeting ``fraction`` of the latency model's base. When its
        first call finds the target below the model's floor (``UnreachableTarget``), the narrowest widths
        are timed: measured above the band the target is refused (``AutopruneError`` naming the measured
        floor), else the loop goes on from them. The first call's other ``AutopruneError`` propagates; a
        later re-aim below what the minimum widths reach ends the loop. Returns the chosen aim and every
        measured round.
        """
        centre = _centre(target)
        aim, done = float(target), []
        while len(done) < self.rounds:
            try:
                widths = allocate(aim)
            except AutopruneError as exc:
                if not done and isinstance(exc, UnreachableTarget):  # below the model's floor: the device decides
                    aim = self._floor_round(target, exc, done)
                    if aim is None:
                        break
                    continue
                if not done:
                    raise
                log.info("latency feedback: aim %.3f is below the fastest reachable fraction; stopping", aim)
                break
            got = FeedbackRound(aim, float(self.measure(widths)))
            done.append(got)
            log.info("latency feedback: aimed %.3f of the model, measured %.3f (target %.3f)", aim, got.measured,
                     target)
            if got.miss(target) == 0 or not math.isfinite(got.measured) or got.measured <= 0:
                break
            nxt = min(1.0, aim * centre / got.measured)
            if any(abs(nxt - r.aim) < MIN_STEP for r in done):
                break
            aim = nxt
        best = min(done, key=lambda r: (r.miss(target), r.measured > target + ABOVE, abs(r.measured - centre)))
        if best.miss(target) > 0:
            warn(f"latency feedback: none of {len(done)} timed allocation(s) measured in "
                 f"[{target - BELOW:.2f}, {target + ABOVE:.2f}] of the base (readings "
                 f"{', '.join(f'{r.measured:.3f}' for r in done)}); kept the closest. Readings that jump between "
                 "rounds mean this device's timings are noisy at this size: raise the timing rounds "
                 "(--latency-rounds) or the batch size", stacklevel=3)
        return best.aim, done

    def _floor_round(self, target: float, exc: UnreachableTarget, done: list[FeedbackRound]) -> float | None:
        """The latency model puts its fastest widths above ``target``: time them. Measured above the band,
        the target is unreachable on this device too (one line naming the measured floor); in band, they
        are the allocation (None: stop); below it, the next aim, re-aimed from the floor."""
        got = FeedbackRound(exc.floor, float(self.measure(exc.widths)))
        log.info("latency feedback: the model's fastest widths (%.3f of the model) measured %.3f (target %.3f)",
                 exc.floor, got.measured, target)
        if not math.isfinite(got.measured) or got.measured <= 0:  # a broken reading: the model's refusal stands
            raise exc
        if got.measured > target + ABOVE:
            raise AutopruneError(f"latency target {target:.3f} is unreachable on this device: the smallest reachable "
                                 f"fraction measured {got.measured:.3f} of the base's latency (the narrowest allowed "
                                 f"widths; the latency model predicted {exc.floor:.3f}); raise the target or lower "
                                 "min_ratio") from None
        done.append(got)
        if got.miss(target) == 0:
            return None
        return min(1.0, exc.floor * _centre(target) / got.measured)


def _centre(target: float) -> float:
    """The middle of the acceptance band, what a re-aim steers the measured fraction to."""
    return target - (BELOW - ABOVE) / 2


def rounds_info(target: float, rounds: Sequence[FeedbackRound], chosen: float) -> dict[str, Any]:
    """What ``PruneResult.info["latency_feedback"]`` records: each round's aim and measured fraction."""
    return {"target": target, "aim": chosen, "rounds": [{"aim": r.aim, "measured": r.measured} for r in rounds],
            "in_band": any(r.aim == chosen and r.miss(target) == 0 for r in rounds)}
