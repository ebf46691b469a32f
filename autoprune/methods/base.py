"""The method interface: every pruning method is a small class behind one contract.

A method receives a :class:`PruneContext` (a private copy of the model, its channel groups, the
analytic cost model, the MACs target, the allocation config, data and a training budget) and
returns which channels to keep per group plus the model to cut. Scoring methods (L1, LRF, FSM)
score channels and let :meth:`PruneContext.allocate` pick widths; training-time methods (ResRep)
train first and decide the mask on the way. Compensation and folding edit weights of the model they
return; its architecture must stay the base architecture so the keep sets apply to it.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..allocate import AllocationConfig, allocate, select
from ..cost import WidthCost
from ..errors import SpecError
from ..graph import ChannelGroup


@dataclass
class PruneContext:
    model: nn.Module
    groups: list[ChannelGroup]
    cost: WidthCost
    target: float
    allocation: AllocationConfig
    device: torch.device
    input_shape: tuple[int, int, int]
    data: Any = None  # autoprune.data.Dataset: train split for methods that train or calibrate
    train_cfg: Any = None  # autoprune.train.TrainConfig: budget for methods that train while pruning
    progress: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def allocate(self, scores: Mapping[str, torch.Tensor] | None) -> dict[str, int]:
        """Widths per prunable group meeting the MACs target (see :func:`autoprune.allocate.allocate`)."""
        return allocate(self.groups, scores, self.cost, self.target, self.allocation)

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
