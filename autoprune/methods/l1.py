"""L1-magnitude pruning: the baseline every other method is compared against.

A channel's score is the L1 norm of the filters that produce it, summed over the group's leader
convs (a residual-coupled group has several), which is what Li et al. (2017) and Torch-Pruning's
``MagnitudeImportance(p=1)`` use. No compensation.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import NoParams, PruneContext, ScoringMethod
from .registry import register_method


@register_method
class L1(ScoringMethod):
    name = "l1"
    Params = NoParams
    summary = "L1 norm of each channel's filters (baseline, no compensation)"

    def scores(self, ctx: PruneContext, params: Any) -> dict[str, torch.Tensor]:
        out = {}
        for g in ctx.prunable:
            total = torch.zeros(g.channels)
            for name in g.leaders:
                w = ctx.module(name).weight.detach().float().cpu()
                total += w.abs().reshape(w.shape[0], -1).sum(1)
            out[g.name] = total
        return out
