"""Adaptive BN recalibration: re-estimate BatchNorm running statistics after surgery.

After channels are removed (and weights compensated), every BN's running mean and variance
describe the *old* network's activations. EagleEye (Li et al., "EagleEye: Fast Sub-net Evaluation
for Efficient Neural Network Pruning", ECCV 2020) showed that re-estimating them on a few hundred
training images, in train mode and without any gradient step, turns a one-shot pruned model from
near chance into a usable one, and that the recalibrated accuracy ranks candidates far better.

This is an engine step shared by every method (``engine.prune(..., recalibrate_batches=N)``); it
never changes a weight, only ``running_mean`` / ``running_var`` / ``num_batches_tracked``.
:func:`restat_bn` is its function-preserving variant for BNs whose statistics were set by
assumption (ResRep's fold): it also rewrites their affine so that the eval output stays the same.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..train import Split

from ..errors import warn

log = logging.getLogger(__name__)

# 32 batches of 64 = 2048 training images, the same order as EagleEye's 50 x 100 on ImageNet; the
# Fashion-MNIST quality benchmark states the number it used next to its table.
DEFAULT_BATCHES = 32
DEFAULT_BATCH_SIZE = 64

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def calibration_batches(split: Split, count: int, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``count`` batches ``(x, y)`` of ``split`` shuffled with ``seed``, without augmentation.

    The one policy every calibration pass uses (BN recalibration, LRF's feature statistics, FSM's
    measured means): the shuffling generator lives on the split's device and is seeded with the run's
    seed, so a pass sees the same images on every call with that seed, on any device.
    """
    gdev = getattr(split, "device", torch.device("cpu"))
    gen = torch.Generator(device=gdev if torch.device(gdev).type == "cuda" else "cpu").manual_seed(seed)
    return itertools.islice(split.batches(batch_size, shuffle=True, generator=gen), count)


def _batches(split: Split, batches: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Inputs of :func:`calibration_batches`, skipping any of one image: BN cannot estimate a
    variance from one sample."""
    for x, _ in calibration_batches(split, batches, batch_size, seed):
        if x.shape[0] >= 2:
            yield x


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@contextlib.contextmanager
def kept_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block BN running statistics may change (e.g. :func:`recalibrate_bn` for a reading);
    on exit every BN's running mean, variance and batch count are what they were."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batches: int = DEFAULT_BATCHES,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
                   seed: int = 0) -> int:
    """Reset every BN's running statistics and re-estimate them on ``batches`` training batches.

    ``split`` is an :class:`autoprune.data.datasets.Split` (batches of ``(x (N, C, H, W) float, y)``), read
    shuffled with ``seed`` and without augmentation. Statistics are the exact average over the
    batches seen (BN ``momentum=None`` during the pass), not an exponential average. Only BN layers
    run in train mode; dropout and every other module stay in eval mode, and every module's mode and
    every BN's momentum are restored afterwards. Weights are never changed.

    Returns the number of images used (0 when the model has no BN with running statistics or
    ``batches`` is 0). Raises ``ValueError`` for a negative ``batches`` or a non-positive ``batch_size``.
    """
    if batches < 0:
        raise ValueError(f"recalibrate_batches must be >= 0, got {batches}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if batches == 0 or not bns:
        return 0
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    try:
        for x in _batches(split, batches, batch_size, seed):
            model(x.to(device, non_blocking=True))
            seen += int(x.shape[0])
    finally:
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum
    if seen == 0:  # no usable batch: keep the statistics the model had rather than the reset values
        for m, (mean, var, count) in saved.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        warn("BN recalibration found no batch of 2 or more images; BN statistics left unchanged")
    log.debug("BN recalibration: %d layers re-estimated on %d images", len(bns), seen)
    return seen


@torch.no_grad()
def restat_bn(model: nn.Module, bns: list[nn.Module], split: Split, batches: int = DEFAULT_BATCHES,
              batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
              seed: int = 0) -> int:
    """Give ``bns`` the running statistics of their inputs without changing the model's eval function.

    The model runs in eval mode on ``batches`` shuffled training batches (as :func:`recalibrate_bn`);
    each listed BN's per-channel input mean mu' and (biased) variance v' are measured exactly, and its
    affine absorbs the change: the eval map y = s x + t (s = gamma / sqrt(v + eps), t = beta - s mu)
    is kept by gamma' = s sqrt(v' + eps), beta' = t + s mu'. Why: a BN whose statistics are not its
    input's (a folded one, see :func:`autoprune.methods.compactor._fold_bn`) changes the function when
    a later :func:`recalibrate_bn` or a train-mode fine-tune replaces them; after this step both
    leave it (up to sampling) as it is. Returns the number of images measured (0: nothing changed).
    """
    if batch_size < 1 or batches < 0:
        raise ValueError(f"restat_bn needs batches >= 0 and batch_size >= 1, got {batches}, {batch_size}")
    bns = [m for m in bns if isinstance(m, _BN) and m.track_running_stats and m.affine]
    if batches == 0 or not bns:
        return 0
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(m: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
        x = inp[0].double().transpose(0, 1).reshape(inp[0].shape[1], -1)
        n = torch.tensor(float(x.shape[1]), dtype=torch.float64, device=x.device)
        s = sums.setdefault(m, [torch.zeros_like(n), torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0])])
        s[0] += n
        s[1] += x.sum(1)
        s[2] += x.square().sum(1)

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in bns]
    seen = 0
    try:
        model.eval()
        for x in _batches(split, batches, batch_size, seed):
            model(x.to(device, non_blocking=True))
            seen += int(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for m, (n, total, squares) in sums.items():
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0)
        scale = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
        shift = m.bias.double() - scale * m.running_mean.double()
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        m.weight.copy_((scale * torch.sqrt(var + m.eps)).to(m.weight.dtype))
        m.bias.copy_((shift + scale * mean).to(m.bias.dtype))
    log.debug("BN re-statistics: %d layers measured on %d images, eval function kept", len(sums), seen)
    return seen
