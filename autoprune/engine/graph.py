"""Channel groups: which layers must lose the same channels, and the surgery that removes them.

Torch-Pruning's DependencyGraph finds the coupling (residual adds, depthwise convs, concatenation
offsets, flatten before a Linear). This module is the only one that sees Torch-Pruning types: the
rest of autoprune works with our own :class:`ChannelGroup`.

Each group records, for every layer it touches, which of that layer's channel indices each group
channel maps to, in the base model's coordinates. Surgery removes all groups' channels from each
layer in one step, so applying a Plan never depends on the order of groups (concatenation offsets
stay valid) and never needs the dependency graph of the model being cut.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import PrunerBox

from ..errors import AutopruneError
from .cost import (
    MAC_LAYERS,
    LayerGeom,
    Term,
    WidthCost,
    count_macs,
    count_params,
    is_depthwise,
    layer_geometry,
)
from .reshapes import watch_reshapes
from .trace import ModelTrace, keep_rng, safe_copy, trace_model

log = logging.getLogger(__name__)

# Autograd ops Torch-Pruning passes channels through without understanding them. A group that
# crosses one is unsafe to prune (DESIGN.md section 3: zero-padding "option A" shortcuts).
_UNSAFE_OPS = ("ConstantPadNd", "ReflectionPad", "ReplicationPad", "Roll", "Gather", "IndexSelect")


@dataclass(frozen=True)
class Member:
    """One tensor slice that a group's channels touch."""

    module: str
    kind: str  # "conv" | "bn" | "linear" | "other"
    dim: str  # "out" | "in"
    index: tuple[tuple[int, ...], ...]  # index[c]: this member's channel indices for group channel c


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together, named by their first leader."""

    name: str
    channels: int
    leaders: tuple[str, ...]
    bns: tuple[str, ...]
    passthrough: tuple[str, ...]
    consumers: tuple[str, ...]  # layers reading the channels in eval mode (what methods score and compensate)
    members: tuple[Member, ...] = field(repr=False)
    residual: bool
    prunable: bool
    reason: str
    depth: float
    train_consumers: tuple[str, ...] = ()  # consumers running only in training (an auxiliary head): cut, not scored

    def member(self, module: str, dim: str) -> Member | None:
        for m in self.members:
            if m.module == module and m.dim == dim:
                return m
        return None


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "otherconv"  # 1-d, 3-d or transposed: counted in MACs, not pruned
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(module, nn.Linear):
        return "linear"
    return "other"


def _build_group(
    tp_group, names: dict[nn.Module, str], order: dict[str, int], n_layers: int, depthwise: set[str],
    shared: Mapping[str, int], train_only: Sequence[str] = (), mixing: Mapping[object, str] | None = None,
) -> ChannelGroup:
    slices: dict[tuple[str, str], dict[int, set[int]]] = {}
    kinds: dict[str, str] = {}
    unsafe: list[str] = []
    mixed: list[str] = []
    grouped: list[str] = []
    other_convs: list[str] = []
    norms: list[str] = []
    for item in tp_group:
        dep = item.dep
        module = dep.target.module
        if isinstance(module, nn.GroupNorm) and 1 < module.num_groups and module in names:
            norms.append(f"GroupNorm {names[module]!r} ({module.num_groups} groups of "
                         f"{module.num_channels // module.num_groups} channels)")
        for node in (dep.source, dep.target):
            if mixing and node.grad_fn in mixing and mixing[node.grad_fn] not in mixed:
                mixed.append(mixing[node.grad_fn])
        if module not in names:  # a functional op (add, reshape, concat, pad ...)
            op = str(dep.target.name)
            if any(u in op for u in _UNSAFE_OPS):
                unsafe.append(op.split("(")[-1].rstrip(")"))
            continue
        name = names[module]
        dim = "out" if "out" in dep.handler.__name__ else "in"
        if isinstance(module, nn.Conv2d) and is_depthwise(module):
            dim = "out"  # in and out are the same channels
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            grouped.append(name)
        kinds[name] = _kind(module)
        if kinds[name] == "otherconv":
            other_convs.append(f"{type(module).__name__} {name!r}")
        per_channel = slices.setdefault((name, dim), {})
        for idx, root in zip(item.idxs, item.root_idxs):
            per_channel.setdefault(int(root), set()).add(int(idx))
    channels = len(tp_group[0].idxs)
    members = []
    for (name, dim), per_channel in slices.items():
        index = tuple(tuple(sorted(per_channel.get(c, ()))) for c in range(channels))
        members.append(Member(name, kinds[name], dim, index))
    members.sort(key=lambda m: (order.get(m.module, 1 << 30), m.dim))
    leaders = tuple(m.module for m in members if m.dim == "out" and m.kind in ("conv", "linear", "otherconv")
                    and m.module not in depthwise)
    passthrough = tuple(m.module for m in members if m.module in depthwise)
    bns = tuple(m.module for m in members if m.kind == "bn")
    readers = [m.module for m in members if m.dim == "in" and m.kind in ("conv", "linear", "otherconv")]
    consumers = tuple(c for c in readers if c not in train_only)
    train_consumers = tuple(c for c in readers if c in train_only)
    reason = _unprunable(members, leaders, train_only, shared, other_convs, unsafe, grouped,
                          mixed, norms)
    name = leaders[0] if leaders else members[0].module
    depth = order.get(name, 0) / max(1, n_layers - 1)
    return ChannelGroup(name=name, channels=channels, leaders=leaders, bns=bns, passthrough=passthrough,
                        consumers=consumers, members=tuple(members), residual=len(leaders) > 1,
                        prunable=not reason, reason=reason, depth=depth, train_consumers=train_consumers)


def _unprunable(members: list[Member], leaders: tuple[str, ...], train_only: Sequence[str],
                shared: Mapping[str, int], other_convs: list[str], unsafe: list[str], grouped: list[str],
                mixed: Sequence[str] = (), norms: Sequence[str] = ()) -> str:
    """Why a group cannot be pruned ("" if it can)."""
    reused = sorted({m.module for m in members if shared.get(m.module, 1) > 1})
    if leaders and all(name in train_only for name in leaders):
        return "is produced only in training (an auxiliary branch): it costs no MACs at inference"
    if reused:
        return (f"touches layer {reused[0]!r}, which forward calls {shared[reused[0]]} times "
                "(a shared module: its channels cannot be followed)")
    if mixed:
        return (f"crosses a reshape that moves channels between dimensions ({mixed[0]}; a channel shuffle, "
                "pixel shuffle or head split): Torch-Pruning cannot map its channel indices")
    if norms:
        return (f"touches {norms[0]}: removing single channels would change its groups, and autoprune does not "
                "prune GroupNorm in whole-group steps")
    if other_convs:
        return f"touches a {other_convs[0]} (only Conv2d and Linear layers are pruned)"
    if unsafe:
        return f"crosses an op Torch-Pruning cannot follow ({', '.join(sorted(set(unsafe)))})"
    if grouped:
        return f"touches a grouped convolution ({grouped[0]})"
    if not leaders:
        return "has no conv or linear producing its channels"
    if any(len({len(ix) for ix in m.index}) != 1 or not m.index[0] for m in members):
        return "maps channels unevenly onto a layer"
    return ""


def find_groups(
    model: nn.Module, input_shape: Sequence[int], check: bool = True, ignored: Sequence[str] = (),
    batches: Sequence[torch.Tensor] = (),
) -> list[ChannelGroup]:
    """Channel groups of ``model`` for inputs of shape ``input_shape`` (C, H, W), in forward order.

    The layers producing the model's outputs (found by following the autograd graph back from the
    outputs, in eval and in training mode) are never pruned, so the number of classes never changes.
    A layer that runs only in training (an auxiliary head) is traced too: the graph is built in
    training mode then, on a copy; such a layer is cut with the group it reads (``train_consumers``),
    while methods score and compensate through the eval-mode ``consumers``. Groups touching a layer
    that forward calls more than once, or a convolution other than ``nn.Conv2d`` (transposed, 1-d,
    3-d), are unprunable with the reason.
    With ``check``, every prunable group is verified by a trial removal (one channel from every group,
    then an eval forward whose MACs must match the analytic count, and a training-mode forward);
    groups that fail are marked unprunable with the reason.
    ``batches``: real inputs (:func:`~autoprune.engine.trace.trace_batches`) traced besides the probes; an
    input that takes another branch adds its graph, and the groups are merged
    (:mod:`autoprune.engine.branches`); layers no input ran are named in one warning, and the groups that
    may feed them stay unpruned. The trial removal runs every such input too.
    Raises ``AutopruneError`` if the model cannot be traced.
    """
    from .branches import mark_never_ran, merge_groups

    info = trace_model(model, input_shape, batches)
    groups = _groups_from_trace(model, input_shape, info, ignored)
    if len(info.examples) > 1:
        extra = [_groups_from_trace(model, input_shape, info, ignored, example=x) for x in info.examples[1:]]
        groups = merge_groups([groups, *extra])
    groups = mark_never_ran(model, groups, info.never_ran, with_data=bool(batches))
    if check:
        groups = _check_groups(model, groups, input_shape, info)
    return groups


def _groups_from_trace(model: nn.Module, input_shape: Sequence[int], info: ModelTrace,
                       ignored: Sequence[str], example: torch.Tensor | None = None) -> list[ChannelGroup]:
    """Groups of one Torch-Pruning graph, traced on a constant probe (in training mode when some layer runs
    only then) or, given ``example``, on that input in eval mode."""
    train = bool(info.train_only) and example is None
    traced = safe_copy(model) if train else model  # a training-mode trace must not touch BN stats
    names = {m: n for n, m in traced.named_modules()}
    modules = dict(traced.named_modules())
    layers = [n for n, m in traced.named_modules() if isinstance(m, MAC_LAYERS)]
    order = {n: i for i, n in enumerate(layers)}
    depthwise = {n for n, m in traced.named_modules() if isinstance(m, nn.Conv2d) and is_depthwise(m)}
    ignore = [modules[n] for n in (*info.outputs, *ignored)]
    was_training = traced.training
    traced.train(train)
    try:
        if example is None:  # no RNG use: grouping must not shift seeds
            example = torch.ones(2 if train else 1, *input_shape, device=_device(model))  # BN in training: 2
        with torch.enable_grad(), keep_rng(example.device), watch_reshapes() as watch:  # TP traces autograd
            # Torch-Pruning switches to eval mode before its forward; forward_fn switches back when needed

            def forward(m: nn.Module, x: torch.Tensor) -> object:
                with watch:
                    return m.train(train)(x)

            dg = tp.DependencyGraph().build_dependency(traced, example_inputs=example, forward_fn=forward)
            tp_groups = list(dg.get_all_groups(ignored_layers=ignore, root_module_types=[nn.Conv2d, nn.Linear]))
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise AutopruneError(f"could not trace {type(model).__name__} for channel groups "
                             f"({type(exc).__name__}: {first})") from exc
    finally:
        traced.train(was_training)
    groups = [_build_group(g, names, order, len(layers), depthwise, info.calls, info.train_only, watch.found)
              for g in tp_groups]
    groups.sort(key=lambda g: (g.depth, g.name))
    seen: set[str] = set()
    for g in groups:
        if g.name in seen:
            raise AutopruneError(f"two channel groups share the leader {g.name!r}; this architecture is not supported")
        seen.add(g.name)
    return groups


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _mark(group: ChannelGroup, reason: str) -> ChannelGroup:
    return replace(group, prunable=False, reason=reason)


def _trial(model: nn.Module, groups: list[ChannelGroup], cost: WidthCost, input_shape: Sequence[int],
           train_forward: bool, examples: Sequence[torch.Tensor] = ()) -> str:
    """Remove one channel from each of ``groups`` in a copy; '' if it works, else what went wrong."""
    trial = safe_copy(model)
    keep = {g.name: range(1, g.channels) for g in groups}
    try:
        remove_channels(trial, groups, keep)
        macs = count_macs(trial, input_shape, device=_device(model))
        with torch.no_grad():
            for x in examples[1:]:  # inputs taking other branches than the constant probe
                trial.eval()(x)
        if train_forward:  # a branch that runs only in training must still fit
            with torch.no_grad(), keep_rng(_device(model)):
                trial.train()(torch.ones(2, *input_shape, device=_device(model)))
    except Exception as exc:  # noqa: BLE001 - any failure means "not prunable"
        return f"trial removal failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
    expected = cost.macs({g.name: g.channels - 1 for g in groups})
    if macs != expected:
        return f"trial removal gave {macs} MACs, analytic count {expected}"
    return ""


def _check_groups(model: nn.Module, groups: list[ChannelGroup], input_shape: Sequence[int],
                  info: ModelTrace) -> list[ChannelGroup]:
    cost = build_width_cost(model, groups, input_shape)
    bad: dict[str, str] = {}

    def search(candidates: list[ChannelGroup]) -> None:  # bisect to the groups that fail alone
        if not candidates:
            return
        problem = _trial(model, candidates, cost, input_shape, bool(info.train_only), info.examples)
        if not problem:
            return
        if len(candidates) == 1:
            bad[candidates[0].name] = problem
            return
        half = len(candidates) // 2
        search(candidates[:half])
        search(candidates[half:])

    search([g for g in groups if g.prunable and g.channels > 1])
    for name, why in bad.items():
        log.info("group %s is not prunable: %s", name, why)
    return [_mark(g, bad[g.name]) if g.name in bad else g for g in groups]


def build_width_cost(model: nn.Module, groups: Sequence[ChannelGroup], input_shape: Sequence[int]) -> WidthCost:
    """Analytic cost model of ``model`` over the prunable ``groups`` (see :class:`WidthCost`)."""
    geoms: list[LayerGeom] = layer_geometry(model, tuple(input_shape), _device(model))
    known = {g.name for g in geoms}
    terms, channels, bn_channels = [], {}, {}
    for g in groups:
        channels[g.name] = g.channels
        bn_channels[g.name] = sum(1 for m in g.members if m.kind == "bn")
        for m in g.members:
            if m.module in known:
                terms.append(Term(g.name, m.module, m.dim, len(m.index[0])))
    return WidthCost(geoms, terms, channels, bn_channels, count_params(model))


def remove_channels(model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, Sequence[int]]) -> None:
    """Physically remove, in place, every channel of ``groups`` not listed in ``keep`` (by group name).

    Groups absent from ``keep`` keep all their channels. Raises ``AutopruneError`` for an index
    out of range, an empty group or an unprunable group.
    """
    by_name = {g.name: g for g in groups}
    removed: dict[tuple[str, str], set[int]] = {}
    for name, kept in keep.items():
        if name not in by_name:
            raise AutopruneError(f"channel group {name!r} does not exist in this model")
        g = by_name[name]
        kept_set = {int(c) for c in kept}
        if not kept_set:
            raise AutopruneError(f"channel group {name!r} would keep no channels")
        if min(kept_set) < 0 or max(kept_set) >= g.channels:
            raise AutopruneError(f"channel group {name!r} has {g.channels} channels; kept index out of range")
        drop = [c for c in range(g.channels) if c not in kept_set]
        if not drop:
            continue
        if not g.prunable:
            raise AutopruneError(f"channel group {name!r} is not prunable: it {g.reason}")
        for m in g.members:
            target = removed.setdefault((m.module, m.dim), set())
            for c in drop:
                target.update(m.index[c])
    modules = dict(model.named_modules())
    for (name, dim), idxs in removed.items():
        module = modules[name]
        pruner = PrunerBox.get(tp.ops.module2type(module))
        if pruner is None:
            raise AutopruneError(f"layer {name!r} ({type(module).__name__}) is not supported by channel surgery")
        fn = pruner.prune_out_channels if dim == "out" else pruner.prune_in_channels
        stats = _running_stats(module)
        fn(module, sorted(idxs))
        for buffer_name, values in stats.items():  # Torch-Pruning slices InstanceNorm's affine, not its statistics
            kept = [i for i in range(values.shape[0]) if i not in idxs]
            setattr(module, buffer_name, values[kept].clone())


def _running_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    """An InstanceNorm's per-channel running statistics (``track_running_stats=True``), else {}."""
    if not isinstance(module, nn.modules.instancenorm._InstanceNorm) or not module.track_running_stats:
        return {}
    return {k: getattr(module, k) for k in ("running_mean", "running_var") if getattr(module, k) is not None}
