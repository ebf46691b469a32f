"""The shared pruning engine: groups -> method -> allocation -> surgery -> measured cost.

``prune`` is the library's front door (``autoprune.prune``); the CLI, the search trials and the
benchmarks all go through it, so every method gets the same grouping, allocation and surgery.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import progress as _progress
from ..errors import AutopruneError, warn
from ..methods import PruneContext, get_method, make_params
from .allocate import AllocationConfig
from .calibrate import DEFAULT_BATCHES, has_batchnorm, recalibrate_bn
from .cost import WidthObjective, count_macs, count_params
from .graph import ChannelGroup, build_width_cost, find_groups
from .plan import Plan, apply_plan
from .trace import safe_copy, trace_batches
from .training import EpochCallback, run_method

if TYPE_CHECKING:
    from ..data.datasets import Dataset
    from ..models.registry import ModelSpec
    from ..train import TrainConfig
    from .latency_feedback import LatencyFeedback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    model: nn.Module
    plan: Plan
    macs: int  # MACs for one sample, measured on the pruned model
    params: int
    base_macs: int
    base_params: int
    method: str
    target: float
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    trained_epochs: int = 0  # epochs the method trained while pruning (ResRep; FSM layerwise)
    stopped_early: bool = False  # on_epoch or should_stop ended that training: the model of that point

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.base_macs

    @property
    def params_fraction(self) -> float:
        return self.params / self.base_params


def _input_shape(model_spec: ModelSpec | None, data: Dataset | None,
                 input_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if input_shape is not None:
        return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if model_spec is not None:
        return (model_spec.in_channels, model_spec.image_size, model_spec.image_size)
    if data is not None:
        return (data.in_channels, data.image_size, data.image_size)
    raise AutopruneError("prune() needs input_shape=(C, H, W), a model spec or a data set to know the input size")


def prune(
    model: nn.Module,
    method: str = "l1",
    target: float = 0.5,
    data: Dataset | None = None,
    allocation: AllocationConfig | Mapping[str, Any] | None = None,
    spec: ModelSpec | None = None,
    input_shape: tuple[int, int, int] | None = None,
    device: str | torch.device = "cpu",
    train_cfg: TrainConfig | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    recalibrate_batches: int = DEFAULT_BATCHES,
    objective: WidthObjective | None = None,
    should_stop: Callable[[], bool] | None = None,
    feedback: LatencyFeedback | None = None,
    **params: Any,
) -> PruneResult:
    """Prune a copy of ``model`` to ``target`` x its MACs with ``method``; the input model is untouched.

    ``data`` (an :class:`autoprune.data.datasets.Dataset`) is needed by methods that train or calibrate
    (ResRep, FSM with measured compensation). ``params`` are the method's parameters (see
    ``autoprune methods``). ``groups`` may pass channel groups found earlier for this architecture.
    ``objective``: what ``target`` is a fraction of; None means MACs, a latency model of the device
    (:func:`autoprune.engine.latency.build_latency_model` of this model) makes it a latency target, and
    ``info`` then records the predicted latency fraction and how the latency model was measured.
    ``feedback`` (:class:`~.latency_feedback.LatencyFeedback`, with a latency ``objective``) closes the
    allocation on measurement: the widths are timed on the device and the aim re-set until the measured
    fraction is in band (``info["latency_feedback"]`` records the rounds).
    A method that trains while pruning (ResRep, FSM layerwise) trains in the engine's loop:
    ``on_epoch(epoch, metrics)`` receives each of its epochs (``val_acc`` of the model the method
    would return at that point, its ``macs`` and ``params`` where the method knows them); returning
    True, or ``should_stop()`` returning True, ends that training and the method finalizes the model
    of that point (``PruneResult.stopped_early``).
    ``recalibrate_batches``: after surgery, BN running statistics are re-estimated on this many
    training batches of ``data`` (adaptive BN, EagleEye, ECCV 2020; see :mod:`autoprune.engine.calibrate`);
    0, or no ``data``, skips it. ``info["bn_recalibration_images"]`` records how many images it used.
    Returns the pruned model, its Plan and its measured MACs / params next to the base ones.
    """
    start = time.perf_counter()
    impl = get_method(method)
    method_params = make_params(impl, params)
    if not isinstance(allocation, AllocationConfig):
        allocation = AllocationConfig(**dict(allocation or {}))
    device = torch.device(device)
    shape = _input_shape(spec, data, input_shape)
    work = safe_copy(model).to(device).eval()
    real = trace_batches(data, device)  # real inputs: the graph sees the branches the data takes
    if groups is None:
        with _progress.phase("grouping"):
            groups = find_groups(work, shape, batches=real)
    cost = build_width_cost(work, groups, shape)
    if not any(g.prunable for g in groups):
        first = next((g for g in groups if g.reason), None)
        why = f" (group {first.name!r} {first.reason})" if first is not None else ""
        raise AutopruneError(f"{type(model).__name__} has no prunable channel group{why}; `autoprune info` "
                             "lists every group and why")
    _check_objective(objective, groups)
    if feedback is not None and objective is None:
        raise AutopruneError("prune(feedback=...) closes a latency target on measurement; pass objective= "
                             "(build_latency_model() of this model) too")
    ctx = PruneContext(model=work, groups=groups, cost=cost, target=target, allocation=allocation, device=device,
                       input_shape=shape, data=data, train_cfg=train_cfg, progress=progress, objective=objective,
                       feedback=feedback)
    try:  # torch's errors (a shape mismatch after surgery) become one line naming the model and the cause
        with _progress.phase(f"scoring ({method})"):  # allocation is a phase inside it (PruneContext.allocate)
            run = run_method(impl, ctx, method_params, on_epoch, should_stop)
        pruned = run.output.model
        with _progress.phase("surgery"):
            plan = Plan.from_keep(run.output.keep, groups)
            apply_plan(pruned, groups, plan)
            with torch.no_grad():
                for x in real:
                    pruned.eval()(x)
        recal_images = _recalibrate(pruned, data, recalibrate_batches, device, ctx.seed)
        macs = count_macs(pruned, shape, device)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise AutopruneError(f"pruning {type(model).__name__} with {method} failed ({type(exc).__name__}: {first}); "
                             "a layer may read channels no traced input tied to their producer (a branch the "
                             "probes and data did not take); `autoprune info` lists the groups") from exc
    expected = cost.macs(plan.widths())
    if macs != expected:  # the analytic model and the surgery must agree; if not, allocation is wrong
        raise AutopruneError(f"internal: pruned model has {macs} MACs, analytic count {expected}; please report")
    info = {"method": method, "params": dataclasses.asdict(method_params), **run.output.info,
            "bn_recalibration_images": recal_images, **_objective_info(objective, plan),
            **{k: ctx.info[k] for k in ("latency_feedback",) if k in ctx.info}}
    return PruneResult(model=pruned.eval(), plan=plan, macs=macs, params=count_params(pruned),
                       base_macs=cost.base_macs, base_params=cost.base_params, method=method, target=target,
                       info=info, seconds=time.perf_counter() - start,
                       trained_epochs=run.fit.epochs_run if run.fit is not None else 0,
                       stopped_early=run.fit is not None and run.fit.stopped_early)


def _recalibrate(pruned: nn.Module, data: Dataset | None, batches: int, device: torch.device, seed: int) -> int:
    """The engine's BN recalibration after surgery; the number of images it read."""
    if data is None and batches and has_batchnorm(pruned):
        warn("prune() got no data: BN statistics are not recalibrated after surgery (one-shot accuracy "
             "is often near chance without it); pass data= (an autoprune.data.datasets.Dataset)", stacklevel=3)
    if data is None or not batches:
        return 0
    with _progress.phase("BN recalibration"):
        return recalibrate_bn(pruned, data.train, batches, device=device, seed=seed)


def _objective_info(objective: WidthObjective | None, plan: Plan) -> dict[str, Any]:
    """What ``info`` records about the target's cost: its unit, and for a latency model the predicted
    fraction and how the model was measured."""
    if objective is None:
        return {"cost": "macs"}
    return {"cost": objective.unit, "predicted_frac": objective.value(plan.widths()) / objective.base,
            "latency_model": dict(getattr(objective, "info", {}))}


def _check_objective(objective: WidthObjective | None, groups: list[ChannelGroup]) -> None:
    """A latency model made for another architecture would allocate nonsense: refuse it."""
    known = getattr(objective, "multiples", None)
    if known is None:
        return
    names = {g.name for g in groups if g.prunable}
    if set(known) != names:
        raise AutopruneError("the latency model was built for another model (its channel groups differ); "
                             "build it with build_latency_model() of this model")
