"""LRF in feature space: linear replaceability measured on what each consumer actually reads.

The weight-space fit of :mod:`autoprune.methods.lrf` replaces a BN-scaled filter by the others;
that is exact only when nothing nonlinear sits between the BN and the consumer. Through
BN -> ReLU it is not, and measured, it hurts. Here the fit is done on the consumer's input itself:
over a few calibration batches, each consumer's input channels ``x_k`` (every sample and spatial
position one observation; a Linear after a flatten sees each channel at several positions, taken
as more observations) give a mean ``m`` and a covariance ``S`` (C x C). The ridge least squares
``x_k ~ sum_j lambda_j x_j + delta_k`` has the same inverse-Gram algebra as the weight fit with
``G = S + eps * mean(diag S) I``: leave-one-out residual variances ``1/P_kk``, coefficients
``-P_jk/P_kk`` and rank-one Schur updates per removal. The compensation ``v_j += lambda_j v_k``
with ``delta_k * sum(v_k)`` into the consumer's bias (or the running mean of its BN) is then the
least-squares optimal linear correction of that consumer's output for the data, whatever is
nonlinear before it (up to zero-padded borders, where the constant is not seen).

Residual groups have several consumers reading different feature maps (every block of a stage
reads the stream after a different add): each consumer gets its own Gram and its own
coefficients; the removal order is shared and minimises the summed consumer error
``sum_c ||v_c,k||^2 / P_c,kk``. Groups are processed in forward order, and the statistics of a
group are measured on the model with all earlier removals applied (their consumer columns zeroed,
which is what surgery will compute), so each fit sees the features it will really get.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.graph import ChannelGroup

CHUNK_ELEMENTS = 1 << 23  # feature values gathered at once (64 MiB in float64)


@dataclass
class FeatureStats:
    """Per consumer of one group: the mean (n,) and covariance (n, n) of the channels it reads (float64)."""

    mean: dict[str, Tensor]
    cov: dict[str, Tensor]
    count: dict[str, int]


def _gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """(n, observations) float64 from a consumer input ``x`` (N, F, *spatial) and index (n, r)."""
    n, r = index.shape
    sel = x.detach().index_select(1, index.reshape(-1))  # (N, n*r, *spatial)
    sel = sel.reshape(sel.shape[0], n, r, *sel.shape[2:]).movedim(1, 0)
    return sel.reshape(n, -1).double()


@torch.no_grad()
def feature_stats(model: nn.Module, groups: Sequence[ChannelGroup],
                  batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, FeatureStats]:
    """Mean and covariance of every consumer input of ``groups`` over ``batches`` (eval mode,
    forward pre-hooks; parameters, buffers and module modes are unchanged). Keyed by group name."""
    device = next(model.parameters()).device
    index = {(g.name, c): torch.tensor(g.member(c, "in").index, dtype=torch.long, device=device)
             for g in groups for c in g.consumers}
    sums: dict[tuple[str, str], Tensor] = {}
    grams: dict[tuple[str, str], Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    by_consumer: dict[str, list[str]] = {}
    for g, c in index:
        by_consumer.setdefault(c, []).append(g)

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            per_sample = max(1, x[0].numel())
            chunk = max(1, CHUNK_ELEMENTS // per_sample)  # bounded memory for large feature maps
            for g in by_consumer[name]:
                key = (g, name)
                for start in range(0, x.shape[0], chunk):
                    xs = _gather_channels(x[start:start + chunk], index[key])
                    sums[key] = sums.get(key, 0) + xs.sum(1)
                    grams[key] = grams.get(key, 0) + xs @ xs.T
                    counts[key] = counts.get(key, 0) + xs.shape[1]
        return record

    handles = [model.get_submodule(c).register_forward_pre_hook(hook(c)) for c in by_consumer]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    out: dict[str, FeatureStats] = {}
    for (g, c), total in sums.items():
        k = counts[(g, c)]
        mean = total / k
        cov = grams[(g, c)] / k - torch.outer(mean, mean)
        stats = out.setdefault(g, FeatureStats({}, {}, {}))
        stats.mean[c], stats.cov[c], stats.count[c] = mean, 0.5 * (cov + cov.T), k
    return out
