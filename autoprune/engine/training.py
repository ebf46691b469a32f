"""The engine's side of training while pruning: one loop (:func:`autoprune.train.fit`) for every method.

:func:`run_method` drives a method (:mod:`autoprune.methods.base`): ``prepare`` gives the method's
training hooks (or None), the engine trains with them on the context's training split and budget,
adding the caller's reporting callback (``on_epoch``: the metrics of each epoch, read on the model
the method would return at that point) and stop signal, then ``finalize`` decides the kept channels.
The search's early stopping reads ResRep's compactor epochs through the same callback as any
fine-tune epoch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import AutopruneError

if TYPE_CHECKING:
    from ..methods.base import MethodOutput, PruneContext, PruningMethod, Training
    from ..train import FitResult

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], "bool | None"]  # (epoch from 1, metrics) -> True to stop


@dataclass(frozen=True)
class MethodRun:
    """A method's output and, for a method that trained, the loop's result (epochs run, stopped early)."""

    output: MethodOutput
    fit: FitResult | None = None


def run_method(method: PruningMethod, ctx: PruneContext, params: Any, on_epoch: EpochCallback | None = None,
               should_stop: Callable[[], bool] | None = None) -> MethodRun:
    """prepare -> train with the method's hooks (if any) -> finalize; see the module docstring.

    Training stopped by ``on_epoch`` or ``should_stop`` still finalizes: the result is the model the
    method returns at that point (``MethodRun.fit.stopped_early`` says so).
    """
    training = method.prepare(ctx, params)
    result = None
    if training is not None:
        result = train_while_pruning(ctx, training, on_epoch, should_stop)
    return MethodRun(method.finalize(ctx, params, training), result)


def train_while_pruning(ctx: PruneContext, training: Training, on_epoch: EpochCallback | None,
                        should_stop: Callable[[], bool] | None) -> FitResult | None:
    """Run the engine's training loop with a method's hooks; None when the budget has no step."""
    from ..train import TrainConfig, fit, steps_per_epoch

    if ctx.data is None:
        raise AutopruneError("this method trains while pruning: pass data= (a Dataset from "
                             "autoprune.data.datasets.load_data) to prune()")
    cfg = ctx.train_cfg if ctx.train_cfg is not None else TrainConfig()
    steps = training.steps if training.steps is not None else cfg.epochs * steps_per_epoch(
        len(ctx.data.train), cfg.batch_size)
    if steps <= 0:
        return None
    callbacks = replace(training.callbacks, on_epoch_end=on_epoch, should_stop=should_stop)
    val = ctx.data.val if on_epoch is not None and len(ctx.data.val) else None  # a reading only if asked
    return fit(ctx.model, ctx.data.train, val, cfg, ctx.device, callbacks, training.teacher,
               progress=ctx.progress, steps=steps)
