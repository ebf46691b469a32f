"""L1-magnitude pruning: the baseline every other method is compared against.

A channel's score is the L1 norm of every weight slice it touches, summed over the group: the
filters that produce it, the BN scale that follows them and the consumer columns that read it.
The producer filter alone (Li et al., 2017) is a poor signal when a BN follows the conv, because
BN normalises the filter's magnitude away; the group sum is what Torch-Pruning's group
``MagnitudeImportance(p=1)`` computes, so this baseline is the strong version of L1. No compensation.
"""
from __future__ import annotations

import torch

from .base import NoParams, PruneContext, PruningMethod


class L1(PruningMethod[NoParams]):
    name = "l1"
    Params = NoParams
    summary = "L1 magnitude of each channel's weights across its group (baseline, no compensation)"

    def scores(self, ctx: PruneContext, params: NoParams | None) -> dict[str, torch.Tensor]:
        out = {}
        for g in ctx.prunable:
            total = torch.zeros(g.channels, dtype=torch.float64)
            for member in g.members:
                module = ctx.module(member.module)
                weight = getattr(module, "weight", None)
                if weight is None or member.kind == "other":
                    continue
                w = weight.detach().double().cpu()
                if member.kind == "bn":
                    per_index = w.abs()
                elif member.dim == "out":
                    per_index = w.abs().reshape(w.shape[0], -1).sum(1)
                else:  # consumer: the input columns that read the channel
                    per_index = w.abs().transpose(0, 1).reshape(w.shape[1], -1).sum(1)
                index = torch.tensor(member.index)  # (channels, slices per channel): equal lengths
                total += per_index[index].sum(1)
            out[g.name] = total
        return out
