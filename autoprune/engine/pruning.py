"""The shared pruning engine: groups -> method -> allocation -> surgery -> measured cost.

``prune`` is the library's front door (``autoprune.prune``); the CLI, the search trials and the
benchmarks all go through it, so every method gets the same grouping, allocation and surgery.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import progress as _progress
from ..errors import AutopruneError, warn
from ..methods import EpochReport, PruneContext, get_method, make_params
from .allocate import AllocationConfig
from .calibrate import DEFAULT_BATCHES, has_batchnorm, recalibrate_bn
from .cost import WidthObjective, count_macs, count_params
from .graph import ChannelGroup, build_width_cost, find_groups
from .plan import Plan, apply_plan
from .trace import safe_copy

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

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.base_macs

    @property
    def params_fraction(self) -> float:
        return self.params / self.base_params


def _input_shape(model_spec: Any, data: Any, input_shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    if input_shape is not None:
        return tuple(input_shape)  # type: ignore[return-value]
    if model_spec is not None:
        return (model_spec.in_channels, model_spec.image_size, model_spec.image_size)
    if data is not None:
        return (data.in_channels, data.image_size, data.image_size)
    raise AutopruneError("prune() needs input_shape=(C, H, W), a model spec or a data set to know the input size")


def prune(
    model: nn.Module,
    method: str = "l1",
    target: float = 0.5,
    data: Any = None,
    allocation: AllocationConfig | Mapping[str, Any] | None = None,
    spec: Any = None,
    input_shape: tuple[int, int, int] | None = None,
    device: str | torch.device = "cpu",
    train_cfg: Any = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
    on_epoch: Callable[[EpochReport], bool] | None = None,
    recalibrate_batches: int = DEFAULT_BATCHES,
    objective: WidthObjective | None = None,
    **params: Any,
) -> PruneResult:
    """Prune a copy of ``model`` to ``target`` x its MACs with ``method``; the input model is untouched.

    ``data`` (an :class:`autoprune.data.datasets.Dataset`) is needed by methods that train or calibrate
    (ResRep, FSM with measured compensation). ``params`` are the method's parameters (see
    ``autoprune methods``). ``groups`` may pass channel groups found earlier for this architecture.
    ``on_epoch`` receives each training epoch of a method that trains while pruning (ResRep) as an
    :class:`~autoprune.methods.EpochReport`; returning True stops it with
    :class:`~autoprune.methods.PruneStopped`.
    ``recalibrate_batches``: after surgery, BN running statistics are re-estimated on this many
    training batches of ``data`` (adaptive BN, EagleEye, ECCV 2020; see :mod:`autoprune.engine.calibrate`);
    0, or no ``data``, skips it. ``info["bn_recalibration_images"]`` records how many images it used.
    ``objective``: what ``target`` is a fraction of; None means MACs, a latency model of the device
    (:func:`autoprune.engine.latency.build_latency_model` of this model) makes it a latency target, and
    ``info`` then records the predicted latency fraction and how the latency model was measured.
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
    if groups is None:
        with _progress.phase("grouping"):
            groups = find_groups(work, shape)
    cost = build_width_cost(work, groups, shape)
    if not any(g.prunable for g in groups):
        raise AutopruneError(f"{type(model).__name__} has no prunable channel group; see `autoprune info`")
    _check_objective(objective, groups)
    ctx = PruneContext(model=work, groups=groups, cost=cost, target=target, allocation=allocation, device=device,
                       input_shape=shape, data=data, train_cfg=train_cfg, progress=progress,
                       on_epoch=on_epoch, objective=objective)
    with _progress.phase(f"scoring ({method})"):  # allocation is a phase inside it (PruneContext.allocate)
        out = impl.run(ctx, method_params)
    pruned = out.model
    with _progress.phase("surgery"):
        plan = Plan.from_keep(out.keep, groups)
        apply_plan(pruned, groups, plan)
    recal_images = 0
    if data is None and recalibrate_batches and has_batchnorm(pruned):
        warn("prune() got no data: BN statistics are not recalibrated after surgery (one-shot accuracy "
             "is often near chance without it); pass data= (an autoprune.data.datasets.Dataset)")
    if data is not None and recalibrate_batches:
        seed = int(getattr(train_cfg, "seed", 0) or 0)
        with _progress.phase("BN recalibration"):
            recal_images = recalibrate_bn(pruned, data.train, recalibrate_batches, device=device, seed=seed)
    macs = count_macs(pruned, shape, device)
    expected = cost.macs(plan.widths())
    if macs != expected:  # the analytic model and the surgery must agree; if not, allocation is wrong
        raise AutopruneError(f"internal: pruned model has {macs} MACs, analytic count {expected}; please report")
    info = {"method": method, "params": _plain(method_params), **out.info,
            "bn_recalibration_images": recal_images, "cost": "macs" if objective is None else objective.unit}
    if objective is not None:
        info["predicted_frac"] = objective.value(plan.widths()) / objective.base
        info["latency_model"] = dict(getattr(objective, "info", {}))
    return PruneResult(model=pruned.eval(), plan=plan, macs=macs, params=count_params(pruned),
                       base_macs=cost.base_macs, base_params=cost.base_params, method=method, target=target,
                       info=info, seconds=time.perf_counter() - start)


def _check_objective(objective: WidthObjective | None, groups: list[ChannelGroup]) -> None:
    """A latency model made for another architecture would allocate nonsense: refuse it."""
    known = getattr(objective, "multiples", None)
    if known is None:
        return
    names = {g.name for g in groups if g.prunable}
    if set(known) != names:
        raise AutopruneError("the latency model was built for another model (its channel groups differ); "
                             "build it with build_latency_model() of this model")


def _plain(params: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})
