"""The method interface: every pruning method is scores + optional training hooks + a finalize step.

A method receives a :class:`PruneContext` (a private copy of the model, its channel groups, the
analytic cost model, the objective the target is set in, the allocation config, data and a training
budget). The engine (:func:`autoprune.engine.pruning.run_method`) drives it in three steps:

1. :meth:`PruningMethod.prepare` may return a :class:`Training`: the hooks the method adds to the
   engine's one training loop (:func:`autoprune.train.fit`): ResRep's penalty gradients and mask
   schedule, FSM's layer-by-layer removals. The engine runs the loop, with the caller's reporting
   callback and stop signal; no method trains, builds data splits or calls ``fit`` itself.
   ``Training.reading`` is the model the method would return if training stopped now: the epoch
   readings the caller (the search's early stopping) sees are taken on it.
2. :meth:`PruningMethod.finalize` returns which channels to keep per group plus the model to cut:
   scoring methods score channels (:meth:`PruningMethod.scores`) and let :meth:`PruneContext.allocate`
   pick widths; compensation and folding edit weights of the model they return, whose architecture
   must stay the base architecture so the keep sets apply to it.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from .. import progress
from ..engine.allocate import AllocationConfig, allocate, select
from ..engine.cost import WidthCost, WidthObjective
from ..engine.graph import ChannelGroup
from ..errors import SpecError

if TYPE_CHECKING:
    from ..data.datasets import Dataset
    from ..engine.latency_feedback import LatencyFeedback
    from ..train import Callbacks, TrainConfig

P = TypeVar("P")  # a method's parameters: its own frozen dataclass (``PruningMethod.Params``)


@dataclass
class PruneContext:
    model: nn.Module
    groups: list[ChannelGroup]
    cost: WidthCost  # analytic MACs and parameters (what results report)
    target: float  # fraction of the objective's base value
    allocation: AllocationConfig
    device: torch.device
    input_shape: tuple[int, int, int]
    data: Dataset | None = None  # train split for methods that train or calibrate
    train_cfg: TrainConfig | None = None  # budget and seed for methods that train while pruning
    progress: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    objective: WidthObjective | None = None  # what the target limits (None: MACs, i.e. ``cost``)
    # a latency objective closed on measurement: the allocation's aim is re-set until the measured
    # latency is in band (autoprune.engine.latency_feedback); None: the objective's prediction is trusted
    feedback: LatencyFeedback | None = None
    _aim: float | None = field(default=None, init=False, repr=False)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def target_cost(self) -> WidthObjective:
        """The cost the allocator meets the target in: ``objective`` if given, else analytic MACs."""
        return self.objective if self.objective is not None else self.cost

    @property
    def seed(self) -> int:
        """The run's seed (training seed; also picks calibration batches)."""
        return int(self.train_cfg.seed) if self.train_cfg is not None else 0

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def allocate(self, scores: Mapping[str, torch.Tensor] | None,
                 groups: list[ChannelGroup] | None = None) -> dict[str, int]:
        """Widths per prunable group (of ``groups``, default all) meeting the target
        (see :func:`autoprune.engine.allocate.allocate`)."""
        aim = self.aim(scores, groups)
        with progress.phase("allocation"):
            return allocate(self.groups if groups is None else groups, scores, self.target_cost, aim,
                            self.allocation)

    def aim(self, scores: Mapping[str, torch.Tensor] | None, groups: list[ChannelGroup] | None = None) -> float:
        """The fraction of the objective the allocator is given: ``target``, or with ``feedback`` the aim
        whose widths (allocated from ``scores``) measured in band on the device; found on the first call
        and kept for the run (``info["latency_feedback"]`` records its rounds)."""
        if self.feedback is None or self.objective is None:
            return self.target
        if self._aim is None:
            from ..engine.latency_feedback import rounds_info

            chosen = self.groups if groups is None else groups
            with progress.phase("latency feedback"):
                self._aim, rounds = self.feedback.aim(
                    self.target, lambda a: allocate(chosen, scores, self.target_cost, a, self.allocation))
            self.info["latency_feedback"] = rounds_info(self.target, rounds, self._aim)
        return self._aim

    def select(self, scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return select(scores, widths)


@dataclass
class Training:
    """What a method adds to the engine's training loop while it prunes (see the module docstring).

    ``callbacks`` carries the method's hooks (param_groups, on_optimizer, before/after step, after
    backward, reading, lr_at); the engine adds the caller's reporting callback and stop signal.
    ``steps``: optimizer steps to train (None: the context's ``train_cfg.epochs``). ``state`` is the
    method's own (compactors, schedule), read back by its :meth:`PruningMethod.finalize`.
    """

    callbacks: Callbacks
    state: object = None
    steps: int | None = None
    teacher: nn.Module | None = None


@dataclass(frozen=True)
class MethodOutput:
    keep: dict[str, tuple[int, ...]]
    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoParams:
    pass


class PruningMethod(ABC, Generic[P]):
    """A method: :meth:`scores`, optional :meth:`prepare` (training hooks), :meth:`finalize`."""

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    summary: ClassVar[str] = ""
    notes: ClassVar[tuple[str, ...]] = ()  # shown by `autoprune methods`: e.g. parameters a run may override

    @abstractmethod
    def scores(self, ctx: PruneContext, params: P) -> dict[str, torch.Tensor]:
        """Per-channel importance (higher keeps) for every prunable group; the model is not modified."""

    def prepare(self, ctx: PruneContext, params: P) -> Training | None:
        """The hooks this method trains with while pruning, or None (the default: no training)."""
        return None

    def finalize(self, ctx: PruneContext, params: P, training: Training | None) -> MethodOutput:
        """Decide the kept channels (and edit weights if the method compensates or folds).

        Default: allocate widths from :meth:`scores` and keep the best-scored channels."""
        scores = self.scores(ctx, params)
        widths = ctx.allocate(scores)
        return MethodOutput(keep=ctx.select(scores, widths), model=ctx.model)

    def training_epochs(self, params: P, total_epochs: int) -> int:
        """How many of a trial's ``total_epochs`` this method trains while pruning (ResRep); the
        rest are fine-tuning after surgery. Scoring methods train none, so all epochs fine-tune."""
        return 0


def make_params(method: PruningMethod[P], params: Mapping[str, Any] | None) -> P:
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
            except (TypeError, ValueError, OverflowError):
                raise SpecError(f"method {method.name!r} parameter {key!r} must be a number, got {value!r}") from None
            if not math.isfinite(params[key]):
                raise SpecError(f"method {method.name!r} parameter {key!r} must be a finite number, got {value!r}; "
                                f"the default is {default!r}")
    try:
        return method.Params(**params)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"method {method.name!r}: {exc}") from exc
