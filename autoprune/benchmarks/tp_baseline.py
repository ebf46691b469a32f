"""Torch-Pruning as the baseline: MetaPruner with its own importances, bisected to a MACs target.

Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) prunes by a
channel ``pruning_ratio``, not by a MACs target. To compare at equal MACs we bisect that ratio
until the pruned model's conv + linear MACs are at most the target (the same counter every
autoprune row is held to). Importances as its README shows them: ``GroupMagnitudeImportance(p=1)``,
``BNScaleImportance`` and ``GroupTaylorImportance`` (gradients of a real loss on one calibration
batch); ``global_pruning`` on or off ("uniform": the same ratio in every layer); the classifier in
``ignored_layers``.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..models.registry import classifier_name

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "bnscale", "taylor")


def importance(kind: str) -> Any:
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "bnscale":
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown Torch-Pruning importance {kind!r}; known: {', '.join(IMPORTANCES)}")


def tp_prune(source: nn.Module, kind: str, ratio: float, global_pruning: bool, input_shape: tuple[int, ...],
             calib: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """A pruned copy of ``source``: MetaPruner, one step, channel ratio ``ratio`` (0..1)."""
    model = copy.deepcopy(source).eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, *input_shape, device=device)
    ignored = [model.get_submodule(classifier_name(model))]  # never prune the classifier's outputs
    pruner = tp.pruner.MetaPruner(model, example, importance=importance(kind), pruning_ratio=ratio,
                                  global_pruning=global_pruning, ignored_layers=ignored)
    if kind == "taylor":  # Taylor importance reads .grad: a real loss on a calibration batch
        if calib is None:
            raise ValueError("taylor importance needs a calibration batch")
        model.zero_grad()
        F.cross_entropy(model(calib[0]), calib[1]).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def bisect_ratio(make: Callable[[float], nn.Module], macs_of: Callable[[nn.Module], int], budget: float,
                 iters: int = 11) -> tuple[float, nn.Module]:
    """Smallest channel ratio (to 2^-iters) whose pruned model has at most ``budget`` MACs.

    A ratio at which Torch-Pruning fails (a layer emptied) counts as too high. Raises RuntimeError
    when no ratio reaches the budget.
    """
    lo, hi, best = 0.0, 1.0, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            model = make(mid)
            macs = macs_of(model)
        except Exception as exc:  # noqa: BLE001 - TP raises assorted errors when a layer would be emptied
            log.debug("torch-pruning failed at ratio %.4f: %s", mid, exc)
            hi = mid
            continue
        if macs <= budget:
            hi, best = mid, (mid, model)
        else:
            lo = mid
    if best is None:
        raise RuntimeError("no pruning ratio reached the MACs budget")
    return best


def tp_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs by Torch-Pruning's own counter (it also counts BN, activations and pooling)."""
    device = next(model.parameters()).device
    return int(tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape, device=device))[0])
