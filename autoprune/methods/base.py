"""The method interface: every pruning method is a small class behind one contract.

A method receives a :class:`PruneContext` (a private copy of the model, its channel groups, the
analytic cost model, the MACs target, the allocation config, data and a training budget) and
returns which channels to keep per group plus the model to cut. Scoring methods (L1, LRF, FSM)
score channels and let :meth:`PruneContext.allocate` pick widths; training-time methods (ResRep)
train first and decide the mask on the way. Compensation and folding edit weights of the model they
return; its architecture must stay the base architecture so the keep sets apply to it.

A method that trains may report each epoch to ``PruneContext.on_epoch`` an :class:`EpochReport`:
the validation accuracy of the model it would return if it stopped now (its current mask applied)
and that model's cost. The callback returns True to abandon the run; the method then raises
:class:`PruneStopped` carrying the last report (the search's early stopping uses this to stop a
ResRep trial during its compactor epochs).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import progress
from ..engine.allocate import AllocationConfig, allocate, select
from ..engine.cost import WidthCost, WidthObjective
from ..engine.graph import ChannelGroup
from ..errors import SpecError


@dataclass(frozen=True)
class EpochReport:
    """One training epoch of a method, as the model it would return now.

    ``val_acc`` is None where the method has no such model yet (ResRep: until its mask meets the target
    and the masked rows have been driven to zero);
    ``macs`` and ``params`` (per sample, analytic) are those of the masked widths.
    """

    epoch: int  # 1-based, counted from the start of the method's training
    val_acc: float | None
    macs: int
    params: int
    base_macs: int
    base_params: int


class PruneStopped(Exception):
    """Raised by a method when ``on_epoch`` asked it to stop; ``report`` is the last epoch's."""

    def __init__(self, report: EpochReport) -> None:
        super().__init__(f"stopped after epoch {report.epoch} at the caller's request")
        self.report = report


@dataclass
class PruneContext:
    model: nn.Module
    groups: list[ChannelGroup]
    cost: WidthCost
    target: float
    allocation: AllocationConfig
    device: torch.device
    input_shape: tuple[int, int, int]
    data: Any = None  # autoprune.data.datasets.Dataset: train split for methods that train or calibrate
    train_cfg: Any = None  # autoprune.train.TrainConfig: budget for methods that train while pruning
    progress: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    on_epoch: Callable[[EpochReport], bool] | None = None  # return True to stop (see the module docstring)
    # what ``target`` is a fraction of: None means analytic MACs (``cost``); a latency model of the device
    # (autoprune.engine.latency.LatencyModel) makes it a latency target. Every method allocates against it.
    objective: WidthObjective | None = None

    @property
    def target_cost(self) -> WidthObjective:
        """The :class:`~autoprune.engine.cost.WidthObjective` the target is a fraction of (MACs by default)."""
        return self.objective if self.objective is not None else self.cost

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def allocate(self, scores: Mapping[str, torch.Tensor] | None) -> dict[str, int]:
        """Widths per prunable group meeting the target of :attr:`target_cost` (MACs or latency; see
        :func:`autoprune.engine.allocate.allocate`)."""
        with progress.phase("allocation"):
            return allocate(self.groups, scores, self.target_cost, self.target, self.allocation)

    def select(self, scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return select(scores, widths)


@dataclass(frozen=True)
class MethodOutput:
    keep: dict[str, tuple[int, ...]]
    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoParams:
    pass


class PruningMethod(ABC):
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    summary: ClassVar[str] = ""
    notes: ClassVar[tuple[str, ...]] = ()  # shown by `autoprune methods`: e.g. parameters a run may override

    @abstractmethod
    def run(self, ctx: PruneContext, params: Any) -> MethodOutput:
        """Decide the kept channels (and edit weights if the method compensates)."""

    def training_epochs(self, params: Any, total_epochs: int) -> int:
        """How many of a trial's ``total_epochs`` this method trains while pruning (ResRep); the
        rest are fine-tuning after surgery. Scoring methods train none, so all epochs fine-tune."""
        return 0


class ScoringMethod(PruningMethod):
    """A method that only scores channels: allocate widths, keep the best-scored channels."""

    @abstractmethod
    def scores(self, ctx: PruneContext, params: Any) -> dict[str, torch.Tensor]:
        """Per-channel importance (higher keeps) for every prunable group."""

    def run(self, ctx: PruneContext, params: Any) -> MethodOutput:
        scores = self.scores(ctx, params)
        widths = ctx.allocate(scores)
        return MethodOutput(keep=ctx.select(scores, widths), model=ctx.model)


def make_params(method: PruningMethod, params: Mapping[str, Any] | None) -> Any:
    """Build ``method.Params`` from a mapping; unknown keys or bad values raise ``SpecError``."""
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(method.Params)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise SpecError(f"method {method.name!r} has no parameter {unknown[0]!r}; its parameters: {known}")
    for key, value in params.items():  # coerce YAML/CLI scalars to the declared type
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise SpecError(f"method {method.name!r} parameter {key!r} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                params[key] = type(default)(value)
            except (TypeError, ValueError):
                raise SpecError(f"method {method.name!r} parameter {key!r} must be a number, got {value!r}") from None
    try:
        return method.Params(**params)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"method {method.name!r}: {exc}") from exc
