"""LRF: linearly replaceable filters with weights compensation (Joo et al., AAAI 2021; DESIGN.md 4).

Two fits, one algebra (``fit``):

* ``features`` (default when there is data): a channel is replaceable when what its consumers read
  (the post-activation feature map, measured on calibration batches) is nearly a linear combination
  of the other channels there; the compensation of the consumer weights is then the least-squares
  optimum for the data, through BN -> ReLU too. See :mod:`autoprune.methods.lrf_features`.
* ``weights`` (no data needed): a channel whose BN-scaled filter ``u_k = w_k * gamma_k / sigma_k``
  is (nearly) a linear combination of the other filters of its group can be removed and its
  contribution handed to the others: if ``u_k ~ sum_j lambda_j u_j`` then the BN output
  ``y_k ~ sum_j lambda_j y_j + delta_k`` with the BN offsets ``c = beta - mean * gamma / sigma``
  giving ``delta_k = c_k - sum_j lambda_j c_j``, so a consumer reading ``y_k`` through weights ``v_k``
  loses nothing when ``v_j += lambda_j v_k`` and the constant ``delta_k * sum(v_k)`` moves into its
  bias. Exact only when nothing nonlinear sits between the BN and the consumer (MobileNetV2's linear
  bottlenecks, a residual add); through a ReLU it hurt (measured on Fashion-MNIST ResNet-20, see README).

The score of channel k is ``||residual of the ridge fit of channel k by the others|| * ||v_k||``
(``v_k``: every consumer weight slice reading channel k, squared norms summed over consumers).
All leave-one-out fits come from one inverse: with ``G = U U^T + eps I`` (filters) or the feature
covariance plus ``eps``, and ``P = G^-1``, the ridge residual of k is ``1/P_kk`` and its coefficients
are ``-P_jk / P_kk``. Removing k updates ``P`` by a Schur complement (rank one), the consumer Gram
``H = V V^T`` by the matching congruence, so the greedy schedule costs O(n^3) per group. Chained
removals compose into one ridge least-squares fit of the removed channels by the kept ones, so the
weights are compensated once per group at the end.

Choices of the weight fit, documented here:

* residual groups (several leaders summed): the filters of all leaders are concatenated, so one set
  of coefficients holds for every branch and therefore for their sum;
* the constant goes into the running mean of the BN the consumer feeds directly (no new parameter,
  same architecture), else into the consumer's bias, created on a bias-free layer if needed
  (``plan.load_pruned`` materialises such biases);
* groups whose channels pass through a depthwise conv cannot be compensated (it does not mix
  channels); they are scored by the magnitude the removal loses, ``||u_k|| * |depthwise gain_k| * ||v_k||``.
  The feature fit has no such limit: it reads the consumer's input after the depthwise conv.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine.calibrate import calibration_batches
from ..engine.graph import ChannelGroup
from ..engine.trace import direct_bns
from ..errors import AutopruneError, warn
from .base import MethodOutput, PruneContext, PruningMethod, Training
from .lrf_algebra import (  # noqa: F401 - re-exported: the algebra's public names live on lrf too
    greedy_order,
    greedy_order_multi,
    joint_fit,
    loo_fit,
    loo_residuals,
    ridge_inverse,
    ridge_inverse_gram,
)
from .lrf_features import FeatureStats, feature_stats

log = logging.getLogger(__name__)

Dropped = dict[tuple[str, str], set[int]]  # (module, "in"|"out") -> indices already removed


FITS = ("auto", "features", "weights")


@dataclass(frozen=True)
class LRFParams:
    eps: float = 1e-3  # ridge, relative to the mean of the Gram diagonal
    compensate: bool = True  # add the least-squares fit of removed channels to the remaining consumer weights
    step: int = 1  # channels chosen per greedy step before scores are refreshed (faster, coarser)
    # what is fit: "features" (each consumer's input over calibration batches: optimal for the data
    # through BN -> ReLU), "weights" (the BN-scaled filters: exact only for a linear layer, no data),
    # "auto" (features when prune() has data, else weights; info["fit"] says which ran)
    fit: str = "auto"
    calibration_batches: int = 2  # training batches the feature statistics are measured on (fit=features)

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")


# --------------------------------------------------------------------------- model access


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(scale, offset)`` of an eval-mode BN, or None if it has no running statistics."""
    if bn.running_var is None or bn.running_mean is None:
        return None
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    offset = -bn.running_mean.double() * scale
    if bn.bias is not None:
        offset = offset + bn.bias.detach().double()
    return scale, offset


def _bn(g: ChannelGroup, layer: str, bn_of: dict[str, str],
        mods: dict[str, nn.Module]) -> tuple[Tensor, Tensor] | None:
    """(scale, offset) of the group's BN that directly follows ``layer``, indexed (n, r)."""
    name = bn_of.get(layer)
    if name is None or (g.member(name, "out") or g.member(name, "in")) is None:
        return None
    affine = _bn_affine(mods[name])
    if affine is None:
        return None
    idx = _index(g, name, "out", affine[0].device)
    return affine[0][idx], affine[1][idx]


def _index(g: ChannelGroup, module: str, dim: str, device: torch.device) -> Tensor:
    """(n, r) indices of ``module``'s channels for each group channel (a BN may be listed either way)."""
    member = g.member(module, dim) or g.member(module, "in" if dim == "out" else "out")
    return torch.tensor(member.index, dtype=torch.long, device=device)


def _live(size: int, dropped: set[int], device: torch.device) -> Tensor:
    return torch.tensor([i for i in range(size) if i not in dropped], dtype=torch.long, device=device)


def _in_slices(weight: Tensor, idx: Tensor) -> Tensor:
    """``weight[:, idx[k]]`` for every channel k, as (n, out, r, *kernel) float64."""
    n, r = idx.shape
    w = weight.detach().double().index_select(1, idx.reshape(-1))
    return w.reshape(w.shape[0], n, r, *w.shape[2:]).movedim(1, 0)


@dataclass
class _Group:
    filters: Tensor  # (n, d) BN-scaled filters of all leaders, concatenated
    offsets: Tensor  # (n,) BN offsets summed over leaders (the residual add sums the branches)
    slices: list[tuple[str, Tensor, Tensor]]  # consumer name, index (n, r), slices (n, out, r, *k)
    consumer: Tensor  # (n, m) consumer slices flattened, rows dropped elsewhere masked out
    per_consumer: list[Tensor]  # the same, one (n, m_c) block per consumer (in ``slices`` order)
    gain: Tensor  # (n,) |scale| through depthwise passthroughs (1 without)
    why_not: str  # why the group cannot be compensated ("" if it can)


def _gather(model: nn.Module, g: ChannelGroup, bn_of: dict[str, str], dropped: Dropped) -> _Group:
    mods = dict(model.named_modules())
    dev = next(model.parameters()).device
    parts, offsets, used = [], torch.zeros(g.channels, dtype=torch.float64, device=dev), set()
    for name in g.leaders:
        layer = mods[name]
        w = layer.weight.detach().double()
        w = w.index_select(1, _live(w.shape[1], dropped.get((name, "in"), set()), dev))
        idx = _index(g, name, "out", dev)
        rows = w[idx.reshape(-1)].reshape(g.channels, idx.shape[1], -1)
        bias = (layer.bias.detach().double()[idx] if layer.bias is not None
                else torch.zeros(idx.shape, dtype=torch.float64, device=dev))
        scale, off = torch.ones_like(bias), bias
        affine = _bn(g, name, bn_of, mods)
        if affine is not None:
            used.add(bn_of[name])
            scale, off = affine[0], affine[0] * bias + affine[1]
        parts.append((rows * scale.unsqueeze(-1)).reshape(g.channels, -1))
        offsets += off.sum(1)
    gain = torch.ones(g.channels, dtype=torch.float64, device=dev)
    for name in g.passthrough:  # depthwise: channel k is scaled by its own kernel (and BN)
        idx = _index(g, name, "out", dev)
        gain = gain * mods[name].weight.detach().double()[idx].reshape(g.channels, -1).norm(dim=1)
        affine = _bn(g, name, bn_of, mods)
        if affine is not None:
            used.add(bn_of[name])
            gain = gain * affine[0].abs().mean(1)
    slices, flat = [], []
    for name in g.consumers:
        idx = _index(g, name, "in", dev)
        v = _in_slices(mods[name].weight, idx)
        live = torch.ones(v.shape[1], dtype=torch.float64, device=dev)
        live[list(dropped.get((name, "out"), ()))] = 0.0
        slices.append((name, idx, v))
        flat.append((v * live.reshape(1, -1, *([1] * (v.dim() - 2)))).reshape(g.channels, -1))
    why = ""
    if g.passthrough:
        why = "its channels pass through a depthwise conv"
    elif set(g.bns) - used:
        why = f"BatchNorm {min(set(g.bns) - used)} does not directly follow a leader conv"
    elif any(m.kind == "other" for m in g.members):
        why = "it touches a layer other than conv, linear or BatchNorm"
    consumer = torch.cat(flat, 1) if flat else torch.zeros(g.channels, 0, dtype=torch.float64, device=dev)
    return _Group(torch.cat(parts, 1), offsets, slices, consumer, flat, gain, why)


def _magnitude(data: _Group) -> Tensor:
    return data.filters.norm(dim=1) * data.gain * data.consumer.norm(dim=1)


def _score(data: _Group, eps: float) -> Tensor:
    if data.why_not:
        return _magnitude(data)
    return (data.consumer.pow(2).sum(1) * loo_residuals(data.filters, eps)).sqrt()


@torch.no_grad()
def _compensate(model: nn.Module, name: str, idx: Tensor, v: Tensor, keep: Tensor, removed: Tensor,
                coef: Tensor, delta: Tensor, bn_of: dict[str, str]) -> None:
    """Consumer ``name``: ``v_j += sum_r coef[j, r] v_r``; the constants ``delta`` into its BN mean or bias."""
    layer = model.get_submodule(name)
    new = v[keep] + torch.einsum("kr,r...->k...", coef, v[removed])  # (|keep|, out, r, *kernel)
    cols = idx[keep].reshape(-1)
    layer.weight.data.index_copy_(1, cols, new.movedim(0, 1).reshape(new.shape[1], -1, *new.shape[3:])
                                  .to(layer.weight.dtype))
    shift = delta @ v[removed].reshape(len(removed), v.shape[1], -1).sum(-1)  # (out,)
    bn = model.get_submodule(bn_of[name]) if name in bn_of else None
    if bn is not None and bn.running_mean is not None:
        bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
    elif layer.bias is not None:
        layer.bias.data.add_(shift.to(layer.bias.dtype))
    else:
        layer.bias = nn.Parameter(shift.to(layer.weight.dtype))


@torch.no_grad()
def _zero_columns(model: nn.Module, data: _Group, removed: Tensor) -> None:
    """Zero what consumers read from removed channels: the model then computes what surgery will."""
    for name, idx, _ in data.slices:
        w = model.get_submodule(name).weight
        w.data.index_fill_(1, idx[removed].reshape(-1), 0.0)


@contextmanager
def _single_threaded(device: torch.device) -> Iterator[None]:
    """The greedy loop is thousands of small matrix-vector products: on a CPU, intra-op threads
    only add synchronisation, and on a shared, oversubscribed CPU every product waits for a
    descheduled thread (5x slower measured on ResNet-50). The previous setting is restored."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the method


class LRF(PruningMethod[LRFParams]):
    name = "lrf"
    Params = LRFParams
    summary = ("linearly replaceable filters: remove channels the others can replace (fit on calibration "
               "features, or on weights), compensate consumers")
    notes = (("fit=auto: 'features' when prune() gets data (search trials do), else 'weights'; info.fit records "
             "which ran"),)

    def _setup(self, ctx: PruneContext, params: LRFParams) -> tuple[str, dict[str, str], list]:
        """(the fit that runs, conv -> its direct BN, the calibration batches of the feature fit)."""
        fit = params.fit
        if fit == "auto":
            fit = "features" if ctx.data is not None else "weights"
            if fit == "weights":
                warn("lrf got no data, so it falls back to its weight fit (fit='weights'), which loses to l1 "
                     "through a ReLU; pass data= to prune() for the feature fit, or set fit='weights' to "
                     "silence this", stacklevel=4)
        if fit == "features" and ctx.data is None:
            raise AutopruneError("lrf fit='features' measures consumer inputs on calibration batches: pass "
                                 "data= to prune(), or use fit='weights'")
        bn_of = direct_bns(ctx.model, ctx.input_shape).bn_of
        batches = []
        if fit == "features":
            batch_size = ctx.train_cfg.batch_size if ctx.train_cfg is not None else 128
            batches = list(calibration_batches(ctx.data.train, params.calibration_batches, batch_size, ctx.seed))
        return fit, bn_of, batches

    def scores(self, ctx: PruneContext, params: LRFParams) -> dict[str, Tensor]:
        fit, bn_of, batches = self._setup(ctx, params)
        return self._scores(ctx, params, fit, bn_of, batches)

    def _scores(self, ctx: PruneContext, params: LRFParams, fit: str, bn_of: dict[str, str],
                batches: list) -> dict[str, Tensor]:
        model, groups = ctx.model, ctx.prunable
        if fit == "features":
            stats = feature_stats(model, groups, batches)
            empty = FeatureStats({}, {}, {})
            return {g.name: _feature_score(_gather(model, g, bn_of, {}), stats.get(g.name, empty),
                                           params.eps).float().cpu() for g in groups}
        return {g.name: _score(_gather(model, g, bn_of, {}), params.eps).float().cpu() for g in groups}

    def finalize(self, ctx: PruneContext, params: LRFParams, training: Training | None) -> MethodOutput:
        start = time.perf_counter()
        fit, bn_of, batches = self._setup(ctx, params)
        scores = self._scores(ctx, params, fit, bn_of, batches)
        model, groups = ctx.model, ctx.prunable
        widths = ctx.allocate(scores)
        scored = time.perf_counter()
        dropped: Dropped = {}
        keep_sets: dict[str, tuple[int, ...]] = {}
        uncompensated: dict[str, str] = {}
        compensated = 0
        for g in groups:  # forward order: a group sees the weights its predecessors compensated
            n_remove = g.channels - widths[g.name]
            if n_remove <= 0:
                keep_sets[g.name] = tuple(range(g.channels))
                continue
            data = _gather(model, g, bn_of, dropped)
            if fit == "features":
                order, done_comp, why = _remove_features(model, g, data, batches, n_remove, params, bn_of)
            else:
                order, done_comp, why = _remove_weights(model, data, n_remove, params, bn_of)
            compensated += done_comp
            if why:
                uncompensated[g.name] = why
            keep_sets[g.name] = tuple(sorted(set(range(g.channels)) - set(order)))
            for m in g.members:
                target = dropped.setdefault((m.module, m.dim), set())
                for c in order:
                    target.update(m.index[c])
        done = time.perf_counter()
        for name, why in uncompensated.items():
            if why != "compensation is off":
                log.info("lrf: group %s pruned without compensation: %s", name, why)
        info = {"fit": fit, "compensated_groups": compensated, "uncompensated_groups": len(uncompensated),
                "uncompensated": uncompensated, "seconds_scoring": round(scored - start, 3),
                "seconds_greedy": round(done - scored, 3),
                "channels_removed": sum(g.channels - len(keep_sets[g.name]) for g in groups)}
        if fit == "features":
            info["calibration_images"] = sum(len(y) for _, y in batches)
        return MethodOutput(keep=keep_sets, model=model, info=info)


def _remove_weights(model: nn.Module, data: _Group, n_remove: int, params: LRFParams,
                    bn_of: dict[str, str]) -> tuple[list[int], int, str]:
    """Weight-space greedy: (removal order, 1 if compensated else 0, why not compensated)."""
    if data.why_not:
        return torch.argsort(_magnitude(data).cpu(), stable=True)[:n_remove].tolist(), 0, data.why_not
    p = ridge_inverse(data.filters, params.eps)
    if params.compensate:  # inner products of consumer weights: float32 is plenty
        consumer = data.consumer.float()
        consumer_gram = (consumer @ consumer.T).double()
    else:  # the norms never change: only the diagonal is read
        consumer_gram = torch.diag(data.consumer.pow(2).sum(1))
    with _single_threaded(p.device):
        order = greedy_order(p, consumer_gram, n_remove, params.step, params.compensate)
    if not params.compensate:
        return order, 0, "compensation is off"
    removed = torch.tensor(sorted(order), device=p.device)
    kept = torch.tensor(sorted(set(range(p.shape[0])) - set(order)), device=p.device)
    coef, delta = joint_fit(p, kept, removed, data.offsets)
    for name, idx, v in data.slices:
        _compensate(model, name, idx, v, kept, removed, coef, delta, bn_of)
    return order, 1, ""


def _feature_score(data: _Group, stats: FeatureStats, eps: float) -> Tensor:
    """``sqrt(sum_c ||v_c,k||^2 * residual variance of x_k at consumer c)`` per channel."""
    total = torch.zeros(data.consumer.shape[0], dtype=torch.float64, device=data.consumer.device)
    for (name, _, _), flat in zip(data.slices, data.per_consumer, strict=True):
        if name in stats.cov:  # a consumer that never ran on the calibration batches adds nothing
            p = ridge_inverse_gram(stats.cov[name].to(flat.device), eps)
            total += flat.pow(2).sum(1) / p.diagonal().clamp_min(1e-300)
    return total.sqrt()


def _remove_features(model: nn.Module, g: ChannelGroup, data: _Group, batches: list, n_remove: int,
                     params: LRFParams, bn_of: dict[str, str]) -> tuple[list[int], int, str]:
    """Feature-space greedy on the model with earlier removals applied: (order, compensated, why not)."""
    if not data.slices:  # nothing reads the group: no fit to make, drop the smallest filters
        return torch.argsort(_magnitude(data).cpu(), stable=True)[:n_remove].tolist(), 0, "no consumer reads it"
    stats = feature_stats(model, [g], batches).get(g.name)
    if stats is None or any(name not in stats.cov for name, _, _ in data.slices):
        return torch.argsort(_magnitude(data).cpu(), stable=True)[:n_remove].tolist(), 0, \
            "a consumer never ran on the calibration batches"
    dev = data.consumer.device
    ps = [ridge_inverse_gram(stats.cov[name].to(dev), params.eps) for name, _, _ in data.slices]
    hs = []
    for flat in data.per_consumer:
        if params.compensate:
            f = flat.float()
            hs.append((f @ f.T).double())
        else:
            hs.append(torch.diag(flat.pow(2).sum(1)))
    other = any(m.kind == "other" for m in g.members)
    compensate = params.compensate and not other
    with _single_threaded(dev):
        order = greedy_order_multi(ps, hs, n_remove, params.step, compensate)
    removed = torch.tensor(sorted(order), device=dev)
    kept = torch.tensor(sorted(set(range(g.channels)) - set(order)), device=dev)
    if compensate:
        for (name, idx, v), p in zip(data.slices, ps, strict=True):
            coef, delta = joint_fit(p, kept, removed, stats.mean[name].to(dev))
            _compensate(model, name, idx, v, kept, removed, coef, delta, bn_of)
    _zero_columns(model, data, removed)
    if compensate:
        return order, 1, ""
    return order, 0, "compensation is off" if not params.compensate else \
        "it touches a layer other than conv, linear or BatchNorm"
