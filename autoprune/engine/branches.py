"""Models whose forward takes different branches for different inputs (``if x.std() > 0.5: ...``).

Torch-Pruning builds its dependency graph from one traced forward, so a branch that forward did
not take is missing from it: the group feeding that branch would be cut while the branch still
expects the old width (VainF/Torch-Pruning#211). :func:`autoprune.engine.trace.trace_model` runs
the probe inputs and, when data is given, a few real batches; each input that calls a different set
of layers gets its own graph, and :func:`merge_groups` joins their groups: a group's members,
leaders and consumers are the union over the graphs. A group coupled differently in two graphs
(other channel counts, other channel indices of one layer, or a layer slice claimed by two groups)
is unprunable with the reason. Layers that never ran in any trace are handled by
:func:`mark_never_ran`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

# A :class:`autoprune.engine.graph.ChannelGroup` (graph.py calls this module, so it is not imported here).
ChannelGroup = Any

_DIFFERS = "is coupled differently in the branches different inputs take (data-dependent control flow)"


def _union(*parts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x for part in parts for x in part))


def _join(a: ChannelGroup, b: ChannelGroup) -> ChannelGroup:
    if (b.depth, b.name) < (a.depth, a.name):
        a, b = b, a
    members = {(m.module, m.dim): m for m in a.members}
    clash = a.channels != b.channels
    for m in b.members:
        seen = members.setdefault((m.module, m.dim), m)
        clash = clash or seen.index != m.index
    reason = a.reason or b.reason or (_DIFFERS if clash else "")
    leaders = _union(a.leaders, b.leaders)
    return replace(a, leaders=leaders, bns=_union(a.bns, b.bns), passthrough=_union(a.passthrough, b.passthrough),
                   consumers=_union(a.consumers, b.consumers), members=tuple(members.values()),
                   train_consumers=_union(a.train_consumers, b.train_consumers), residual=len(leaders) > 1,
                   prunable=not reason, reason=reason)


def merge_groups(per_graph: Sequence[list[ChannelGroup]]) -> list[ChannelGroup]:
    """Join the groups of several graphs of one model: groups with the same name, or sharing a slice of
    a layer (``head``'s input read from ``branch_a`` for some inputs and from ``branch_b`` for others),
    become one group with the union of members, leaders and consumers (see the module docstring)."""
    merged: list[ChannelGroup] = []
    for groups in per_graph:
        for g in groups:
            slices = {(m.module, m.dim) for m in g.members}
            hits = [i for i, h in enumerate(merged)
                    if h.name == g.name or slices & {(m.module, m.dim) for m in h.members}]
            for i in reversed(hits):  # join every group it touches into one, named by the earliest
                g = _join(merged.pop(i), g)
            merged.append(g)
    return sorted(merged, key=lambda g: (g.depth, g.name))


def _referenced(model: nn.Module, name: str) -> bool:
    """Whether the ``forward`` of a user-defined ancestor of layer ``name`` names it (or the container
    holding it): a layer forward mentions but never ran sits in a branch not taken; one it never mentions
    is unused (a projection head used by another method). Unreadable source counts as mentioned."""
    import inspect
    import re

    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = model.get_submodule(".".join(parts[:depth]))
        if type(parent).__module__.startswith("torch.nn"):
            continue  # a container (Sequential, ModuleList) runs every child: look at whoever holds it
        sources = []
        for cls in type(parent).__mro__:
            if "forward" in vars(cls) and not cls.__module__.startswith("torch.nn"):
                try:
                    sources.append(inspect.getsource(vars(cls)["forward"]))
                except (OSError, TypeError):
                    return True
        return any(re.search(rf"\b{re.escape(parts[depth])}\b", src) for src in sources)
    return True


def mark_never_ran(model: nn.Module, groups: list[ChannelGroup], never_ran: Sequence[str],
                   with_data: bool) -> list[ChannelGroup]:
    """Warn once naming the conv/linear layers no trace ran. Without data, a layer that forward mentions
    (:func:`_referenced`) may sit in a branch the probes did not take: every group that may feed it or read
    its output (a group whose width equals its input or output width: the layer is in no graph, so which
    groups touch it is unknown) is left unpruned. With data, or for a layer forward never mentions, the
    layer is unused by what was traced: it keeps its width and the rest is pruned."""
    if not never_ran:
        return groups
    modules = dict(model.named_modules())
    doubtful = [] if with_data else [n for n in never_ran if _referenced(model, n)]
    widths = set()
    for n in doubtful:  # the channels it reads, and the channels it writes (read by layers that did run)
        m = modules[n]
        widths |= {getattr(m, "in_channels", getattr(m, "in_features", -1)),
                   getattr(m, "out_channels", getattr(m, "out_features", -1))}
    if doubtful:
        hint = ("forward mentions them, so they may sit in a branch the probe inputs did not take; the channel "
                "groups that may feed or read them are left unpruned: pass data= (the CLI always does) so real "
                "batches trace them")
    else:
        hint = "neither the probe inputs nor the real batches used them" if with_data else "forward never uses them"
        hint += "; they keep their widths"
    warnings.warn(f"{type(model).__name__}: layers {', '.join(never_ran)} never ran in any trace ({hint})",
                  stacklevel=3)
    names = ", ".join(doubtful[:3]) + (" ..." if len(doubtful) > 3 else "")
    reason = (f"may feed or read layers that never ran in any trace ({names}): a branch the probe inputs did "
              "not take; pass data so real batches trace it")
    return [replace(g, prunable=False, reason=reason) if g.prunable and g.channels in widths else g for g in groups]
