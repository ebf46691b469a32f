"""Feature Shift Minimisation (Duan et al., 2022): remove the channels whose loss shifts the next
layer's input least, and put the expected shift back as a constant.

A BN output channel is modelled as ``N(beta_k, gamma_k^2)``; after a ReLU its expected value is
``E_k = beta_k Phi(beta_k/|gamma_k|) + |gamma_k| phi(beta_k/|gamma_k|)``. Removing channel k shifts
consumer output j by ``E_k * sum_hw W[j, k]``; the score is the mean ``|shift|`` over j, averaged
over the group's consumers. Compensation adds the removed channels' shift to the consumer's bias,
or subtracts it from the running mean of a BN reading the consumer's output (equal in eval mode).

What each consumer reads is found by tracing the model (``torch.fx``) and carrying a per-channel
(mean, variance) from every BN to the consumers' inputs. Approximations:

- BN -> ReLU / ReLU6 / Hardtanh: exact clipped-Gaussian moments; other elementwise activations
  (SiLU, GELU, Hardswish, ...): 40-point Gauss-Hermite quadrature.
- Residual adds before the activation (ResNet): summands independent, means and variances add,
  the sum is taken as Gaussian again, so a consumer deep in a stream sees the chain of BNs before
  it (within about 5 % of a Monte Carlo run through a random ResNet-20, on average per consumer).
  Adds after the last BN (MobileNetV2) are linear: exact.
- Depthwise passthrough: the BN after the depthwise conv resets the moments, so its consumers are
  scored from that BN and the activation after it.
- Average pooling, dropout and flatten keep each channel's mean (flatten repeats it over one
  Linear column per position). Max pooling also passes the mean on: a lower bound (on a trained
  digits CNN the measured mean after a 2x2 max pool is about twice as large).
- Conv consumers use the sum over all kernel taps: exact away from zero-padded borders. (Weighting
  taps by how often they see the image matches the spatial mean better, but lost accuracy on
  digits, whose content sits in the centre.)
- Anything else (products such as squeeze-excitation, untraceable models): the consumer falls back
  to ``E[ReLU(N(sum beta, sum gamma^2))]`` over the group's BNs (those after the depthwise conv if
  there is one), or 1 without BN; ``info["fallback_consumers"]`` names them.

``compensation="measured"`` uses the mean of each consumer's input over a few training batches
instead (eval mode, forward pre-hooks). Widths come from the shared allocation. The ``layerwise``
schedule removes groups shallow to deep, fine-tuning briefly after each with the removed channels
held at zero; the engine then cuts them.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import AutopruneError
from ..graph import ChannelGroup
from .base import MethodOutput, PruneContext, PruningMethod
from .registry import register_method

log = logging.getLogger(__name__)

COMPENSATIONS = ("none", "gaussian", "measured")
SCHEDULES = ("oneshot", "layerwise")
LAYERWISE_SHARE = 1 / 3  # of a trial's epochs spent fine-tuning between groups (layerwise schedule)
_TINY = 1e-6  # |gamma| below this: the BN output is the constant beta
_GH_X, _GH_W = (torch.from_numpy(a) for a in np.polynomial.hermite.hermgauss(40))
_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
                nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh)
_ACTIVATION_FNS = (F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, torch.sigmoid,
                   torch.tanh)
_KEEP_MEAN = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
              nn.Identity, nn.Flatten)
_KEEP_MEAN_FNS = (torch.flatten, torch.reshape, torch.squeeze, torch.mean, F.adaptive_avg_pool2d, F.avg_pool2d,
                  F.max_pool2d, F.adaptive_max_pool2d, F.dropout)
_KEEP_MEAN_METHODS = ("flatten", "view", "reshape", "squeeze", "mean", "contiguous", "clone", "float", "to")

Moments = tuple[Tensor, Tensor]  # per-channel mean and variance along a tensor's dim 1


@dataclass(frozen=True)
class FSMParams:
    compensation: str = "gaussian"  # none | gaussian (BN model) | measured (calibration batches)
    schedule: str = "oneshot"  # oneshot | layerwise (groups shallow to deep, fine-tuning between)
    calibration_batches: int = 8  # training batches averaged by compensation="measured"
    layerwise_steps: int = 0  # optimizer steps after each group; 0 = the method's epochs spread evenly

    def __post_init__(self) -> None:
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.calibration_batches < 1 or self.layerwise_steps < 0:
            raise ValueError("calibration_batches must be >= 1 and layerwise_steps >= 0")


# --------------------------------------------------------------------------- Gaussian formulas


def clipped_normal_moments(mean: Tensor, std: Tensor, lo: float = 0.0, hi: float = math.inf) -> Moments:
    """``(E[Y], E[Y^2])`` for ``Y = clamp(X, lo, hi)``, ``X ~ N(mean, std^2)``, elementwise.

    The sign of ``std`` is ignored; ``|std| < 1e-6`` gives ``clamp(mean, lo, hi)``.
    """
    mu, sd = mean.double(), std.double().abs()
    tiny = sd < _TINY
    s = torch.where(tiny, torch.ones_like(sd), sd)
    zero = torch.zeros_like(mu)
    m1, m2, below, pdf_a, apdf_a, above, pdf_b, bpdf_b = zero, zero, zero, zero, zero, zero, zero, zero
    if math.isfinite(lo):
        a = (lo - mu) / s
        below, pdf_a = _cdf(a), _pdf(a)
        apdf_a, m1, m2 = a * pdf_a, lo * below, lo * lo * below
    if math.isfinite(hi):
        b = (hi - mu) / s
        above, pdf_b = _cdf(-b), _pdf(b)
        bpdf_b, m1, m2 = b * pdf_b, m1 + hi * above, m2 + hi * hi * above
    inside = 1.0 - below - above
    m1 = m1 + mu * inside + s * (pdf_a - pdf_b)
    m2 = m2 + (mu * mu + s * s) * inside + 2 * mu * s * (pdf_a - pdf_b) + s * s * (apdf_a - bpdf_b)
    hard = mu.clamp(min=lo, max=hi)
    return torch.where(tiny, hard, m1).to(mean.dtype), torch.where(tiny, hard * hard, m2).to(mean.dtype)


def expected_relu(beta: Tensor, gamma: Tensor) -> Tensor:
    """``E[ReLU(X)]``, ``X ~ N(beta, gamma^2)``: the paper's ``E_k`` (any sign of gamma, gamma ~ 0 too)."""
    return clipped_normal_moments(beta, gamma, 0.0, math.inf)[0]


def _cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _clip(m: Moments | None, lo: float, hi: float) -> Moments | None:
    if m is None:
        return None
    m1, m2 = clipped_normal_moments(m[0], m[1].clamp_min(0).sqrt(), lo, hi)
    return m1, (m2 - m1 * m1).clamp_min(0)


def _quadrature(m: Moments | None, f: Any) -> Moments | None:
    if m is None:
        return None
    x, w = _GH_X.to(m[0]), _GH_W.to(m[0]) / math.sqrt(math.pi)
    y = f((m[0][:, None] + math.sqrt(2.0) * m[1].clamp_min(0).sqrt()[:, None] * x).contiguous())
    m1 = (y * w).sum(1)
    return m1, ((y * y * w).sum(1) - m1 * m1).clamp_min(0)


# --------------------------------------------------------------------------- what consumers read


@dataclass
class ConsumerInputs:
    mean: dict[str, Tensor]  # consumer -> expected value of each of its input channels / features (CPU)
    fallback: list[str] = field(default_factory=list)  # consumers scored with the BN-sum fallback
    bn_after: dict[str, str] = field(default_factory=dict)  # consumer -> the BN that reads its output


class _Propagate(fx.Interpreter):
    """Runs the traced model on a dummy input, carrying BN moments alongside (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, watch: set[str]) -> None:
        super().__init__(gm)
        self.mods = dict(gm.named_modules())
        self.watch = watch
        self.moments: dict[fx.Node, Moments | None] = {}
        self.shapes: dict[fx.Node, torch.Size] = {}
        self.seen: dict[str, Tensor] = {}
        self.bn_after: dict[str, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_module" and n.target in self.watch and n.target not in self.seen:
            m = self._in(n.args[0])
            if m is not None:
                self.seen[n.target] = m[0]
            users = list(n.users)
            if len(users) == 1 and users[0].op == "call_module" and isinstance(self.mods[users[0].target], _BatchNorm):
                self.bn_after[n.target] = users[0].target
        if isinstance(out, Tensor):
            self.shapes[n] = out.shape
            try:
                m = self._rule(n, out) if out.dim() >= 2 and n.op.startswith("call_") else None
            except Exception:  # noqa: BLE001 - an op we misread is unknown, not fatal
                log.debug("fsm: no moments through %s", n.format_node())
                m = None
            self.moments[n] = m if m is not None and m[0].shape == m[1].shape == out.shape[1:2] else None
        return out

    def _in(self, a: Any) -> Moments | None:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return torch.tensor(float(a)), torch.tensor(0.0)
        return self.moments.get(a) if isinstance(a, fx.Node) else None

    def _rule(self, n: fx.Node, out: Tensor) -> Moments | None:
        x = self._in(n.args[0]) if n.args else None
        if n.op == "call_module":
            mod = self.mods[n.target]
            if isinstance(mod, _BatchNorm):
                beta = mod.bias.detach().float() if mod.affine else out.new_zeros(mod.num_features)
                gamma = mod.weight.detach().float() if mod.affine else out.new_ones(mod.num_features)
                return beta, gamma * gamma
            if isinstance(mod, (nn.ReLU, nn.Hardtanh)):  # Hardtanh includes ReLU6
                lo, hi = (0.0, math.inf) if isinstance(mod, nn.ReLU) else (float(mod.min_val), float(mod.max_val))
                return _clip(x, lo, hi)
            if isinstance(mod, _ACTIVATIONS):
                return _quadrature(x, mod)
            if isinstance(mod, _KEEP_MEAN):
                return self._reshape(n.args[0], out)
            if isinstance(mod, nn.Conv2d) and 1 < mod.groups == mod.in_channels == mod.out_channels and x is not None:
                bias = mod.bias.detach().float() if mod.bias is not None else 0.0  # depthwise, no BN yet
                return x[0] * mod.weight.detach().float().sum((1, 2, 3)) + bias, torch.full_like(x[0], math.nan)
            return None
        fn = n.target if n.op == "call_function" else None
        method = n.target if n.op == "call_method" else None
        if fn in (F.relu, torch.relu, torch.relu_) or method in ("relu", "relu_"):
            return _clip(x, 0.0, math.inf)
        if fn is F.relu6:
            return _clip(x, 0.0, 6.0)
        if fn in _ACTIVATION_FNS:
            return _quadrature(x, lambda t: fn(t, *n.args[1:], **n.kwargs))
        if fn in (operator.add, operator.iadd, torch.add) or method in ("add", "add_"):
            y = self._in(n.args[1]) if len(n.args) > 1 else None
            return None if x is None or y is None else (x[0] + y[0], x[1] + y[1])
        if fn in (operator.mul, operator.imul, torch.mul) or method in ("mul", "mul_"):
            y = self._in(n.args[1]) if len(n.args) > 1 else None
            if x is None or y is None or (x[0].dim() and y[0].dim()):
                return None  # a product of two feature maps (squeeze-excitation): not modelled
            return x[0] * y[0], x[1] * y[0] ** 2 + y[1] * x[0] ** 2
        if fn is torch.cat:
            return self._cat(n)
        if fn in _KEEP_MEAN_FNS or method in _KEEP_MEAN_METHODS:
            return self._reshape(n.args[0], out)
        return None

    def _reshape(self, src: Any, out: Tensor) -> Moments | None:
        m = self._in(src)
        if m is None or src not in self.shapes:
            return None
        shape = self.shapes[src]
        if out.shape[1] == shape[1]:
            return m  # pooling, dropout, spatial mean, no-op views
        positions = math.prod(shape[2:])
        if out.dim() == 2 and out.shape[1] == shape[1] * positions:  # flatten: channel-major columns
            return m[0].repeat_interleave(positions), m[1].repeat_interleave(positions)
        return None

    def _cat(self, n: fx.Node) -> Moments | None:
        parts, dim = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if dim not in (1, -3) or not all(isinstance(p, fx.Node) and p in self.shapes for p in parts):
            return None
        known = [self.moments.get(p) for p in parts]
        device = next((m[0].device for m in known if m is not None), None)
        if device is None:
            return None
        nans = [torch.full((self.shapes[p][1],), math.nan, device=device) for p in parts]
        return tuple(torch.cat([nan if m is None else m[i] for m, nan in zip(known, nans)]) for i in (0, 1))


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _fallback(model: nn.Module, g: ChannelGroup) -> Tensor:
    """Per channel of ``g``: E[ReLU] of its summed BNs (those after a passthrough, if any); 1 without BN."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    bns = list(g.bns)
    if g.passthrough:
        bns = [b for b in bns if order[b] > min(order[p] for p in g.passthrough)] or bns
    if not bns:
        return torch.ones(g.channels)
    mean, var = torch.zeros(g.channels), torch.zeros(g.channels)
    for name in bns:
        bn = model.get_submodule(name)
        idx = torch.tensor(next(m for m in g.members if m.module == name).index)
        if bn.affine:
            mean += bn.bias.detach().float().cpu()[idx].sum(1)
            var += (bn.weight.detach().float().cpu()[idx] ** 2).sum(1)
        else:
            var += idx.shape[1]
    return expected_relu(mean, var.sqrt())


@torch.no_grad()
def gaussian_inputs(model: nn.Module, groups: Sequence[ChannelGroup], input_shape: Sequence[int]) -> ConsumerInputs:
    """Expected value of every input feature of the consumers of ``groups`` under the BN model.

    Runs one eval-mode forward pass of a zero batch; parameters, buffers and modes are unchanged.
    """
    seen: dict[str, Tensor] = {}
    out = ConsumerInputs(mean={})
    with _evaluating(model):
        try:
            trace = _Propagate(fx.symbolic_trace(model), {c for g in groups for c in g.consumers})
            trace.run(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
            seen, out.bn_after = trace.seen, trace.bn_after
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "use the fallback"
            log.info("fsm: cannot trace %s (%s); using the BN-sum approximation", type(model).__name__,
                     type(exc).__name__)
    for g in groups:
        fb = None
        for c in g.consumers:
            width = model.get_submodule(c).weight.shape[1]
            vec = out.mean.get(c, seen.get(c))
            vec = vec.float().cpu().clone() if vec is not None and vec.shape == (width,) else None
            vec = torch.full((width,), math.nan) if vec is None else vec
            idx = torch.tensor(g.member(c, "in").index)
            vals = vec[idx]
            if torch.isnan(vals).any():
                fb = _fallback(model, g) if fb is None else fb
                vec[idx] = torch.where(torch.isnan(vals), fb[:, None].expand_as(vals), vals)
                out.fallback.append(c)
            out.mean[c] = vec
    out.fallback = sorted(set(out.fallback))
    return out


@torch.no_grad()
def measured_inputs(model: nn.Module, consumers: Iterable[str],
                    batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Mean of every input feature of ``consumers`` over ``batches`` (eval mode, forward pre-hooks)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            sums[name] = sums.get(name, 0) + x.double().sum([0, *range(2, x.dim())])
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]
        return record

    handles = [model.get_submodule(c).register_forward_pre_hook(hook(c)) for c in set(consumers)]
    device = next(model.parameters()).device
    try:
        with _evaluating(model):
            for x, _ in batches:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return {c: (sums[c] / counts[c]).float().cpu() for c in sums}


def _shifts(model: nn.Module, g: ChannelGroup, consumer: str, inputs: ConsumerInputs) -> Tensor:
    """``[outputs, channels]``: mean shift of each consumer output when each channel of ``g`` goes."""
    w = model.get_submodule(consumer).weight.detach().float()
    w = w.sum(tuple(range(2, w.dim()))) if w.dim() > 2 else w  # conv: all taps (exact away from borders)
    idx = torch.tensor(g.member(consumer, "in").index, device=w.device)
    return (w * inputs.mean[consumer].to(w.device)[None, :])[:, idx].sum(-1)


def group_scores(model: nn.Module, g: ChannelGroup, inputs: ConsumerInputs) -> Tensor:
    """FSM score per channel of ``g``: mean |shift| over consumer outputs, averaged over consumers."""
    per = [_shifts(model, g, c, inputs).abs().mean(0).cpu() for c in g.consumers]
    return torch.stack(per).mean(0) if per else _fallback(model, g)


@torch.no_grad()
def compensate(model: nn.Module, g: ChannelGroup, inputs: ConsumerInputs, removed: Sequence[int]) -> float:
    """Put the removed channels' expected contribution back into each consumer as a constant.

    Into the running mean of the BN that reads the consumer's output, if any (no new parameter),
    else into the consumer's bias (created if missing). Returns the largest |shift| put back.
    """
    largest = 0.0
    for c in g.consumers if removed else ():
        delta = _shifts(model, g, c, inputs)[:, list(removed)].sum(1)
        largest = max(largest, float(delta.abs().max()))
        bn = model.get_submodule(inputs.bn_after[c]) if c in inputs.bn_after else None
        if bn is not None and bn.running_mean is not None and bn.running_mean.shape == delta.shape:
            bn.running_mean.sub_(delta.to(bn.running_mean))
            continue
        module = model.get_submodule(c)
        if module.bias is None:
            module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]))
        module.bias.add_(delta.to(module.bias))
    return largest


# --------------------------------------------------------------------------- the method


class _FirstBatches:
    """The first ``steps`` batches of a split, reshuffled each pass: fit() then runs ``steps`` steps."""

    def __init__(self, split: Any, steps: int, batch_size: int) -> None:
        self.split, self.steps, self.batch_size = split, steps, batch_size

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                augment: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        passes = itertools.chain.from_iterable(
            self.split.batches(batch_size, shuffle, generator, augment) for _ in range(self.steps))
        yield from itertools.islice(passes, self.steps)

    def to(self, device: Any) -> _FirstBatches:
        return _FirstBatches(self.split.to(device), self.steps, self.batch_size)


def _zero_channels(model: nn.Module, g: ChannelGroup, removed: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Zero what produces the removed channels (leaders, BNs, passthroughs); returns (param, rows) pairs."""
    frozen = []
    with torch.no_grad():
        for m in (m for m in g.members if m.dim == "out"):
            module = model.get_submodule(m.module)
            rows = sorted({i for c in removed for i in m.index[c]})
            for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(p, nn.Parameter):
                    idx = torch.tensor(rows, device=p.device, dtype=torch.long)
                    p[idx] = 0
                    frozen.append((p, idx))
    return frozen


@register_method
class FSM(PruningMethod):
    name = "fsm"
    Params = FSMParams
    summary = "feature shift minimisation: BN-modelled mean shift at the consumers, put back as a bias"

    def training_epochs(self, params: FSMParams, total_epochs: int) -> int:
        """The layerwise schedule fine-tunes between groups with a third of the trial's epochs."""
        return round(total_epochs * LAYERWISE_SHARE) if params.schedule == "layerwise" else 0

    def scores(self, ctx: PruneContext, params: FSMParams) -> dict[str, Tensor]:
        """FSM score per channel of every prunable group; the model is not modified."""
        inputs = self._inputs(ctx, params, ctx.prunable)
        return {g.name: group_scores(ctx.model, g, inputs) for g in ctx.prunable}

    def run(self, ctx: PruneContext, params: FSMParams) -> MethodOutput:
        groups = ctx.prunable
        inputs = self._inputs(ctx, params, groups)
        scores = {g.name: group_scores(ctx.model, g, inputs) for g in groups}
        widths = ctx.allocate(scores)
        info: dict[str, Any] = {"fallback_consumers": inputs.fallback}
        if params.schedule == "layerwise":
            keep = self._layerwise(ctx, params, widths, info)
        else:
            keep = ctx.select(scores, widths)
            if params.compensation != "none":
                shifts = [compensate(ctx.model, g, inputs, _removed(g, keep[g.name])) for g in groups]
                info["max_compensation"] = max(shifts, default=0.0)
        return MethodOutput(keep=keep, model=ctx.model, info=info)

    def _inputs(self, ctx: PruneContext, params: FSMParams, groups: Sequence[ChannelGroup]) -> ConsumerInputs:
        inputs = gaussian_inputs(ctx.model, groups, ctx.input_shape)
        if params.compensation == "measured":
            if ctx.data is None:
                raise AutopruneError("fsm compensation='measured' needs calibration data: pass data= to prune(), "
                                     "or use compensation='gaussian'")
            batch_size = ctx.train_cfg.batch_size if ctx.train_cfg is not None else 128
            batches = ctx.data.train.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
            measured = measured_inputs(ctx.model, inputs.mean, itertools.islice(batches, params.calibration_batches))
            inputs.mean.update({c: v for c, v in measured.items() if v.shape == inputs.mean[c].shape})
        return inputs

    def _layerwise(self, ctx: PruneContext, params: FSMParams, widths: Mapping[str, int],
                   info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        from ..train import Callbacks, TrainConfig, fit, steps_per_epoch

        if ctx.data is None:
            raise AutopruneError("fsm schedule='layerwise' fine-tunes between groups and needs training data: "
                                 "pass data= to prune(), or use schedule='oneshot'")
        model = ctx.model
        todo = [g for g in ctx.prunable if widths[g.name] < g.channels]  # groups come in depth order
        keep = {g.name: tuple(range(g.channels)) for g in ctx.prunable if widths[g.name] >= g.channels}
        cfg = ctx.train_cfg if ctx.train_cfg is not None else TrainConfig(epochs=1)
        steps = params.layerwise_steps
        if not steps and todo:
            steps = cfg.epochs * steps_per_epoch(len(ctx.data.train), cfg.batch_size) // len(todo)
        teacher = copy.deepcopy(model).eval() if steps and cfg.distill_alpha > 0 else None
        frozen: list[tuple[Tensor, Tensor]] = []

        def hold_at_zero(_model: nn.Module, _step: int) -> None:
            for p, idx in frozen:
                if p.grad is not None:
                    p.grad[idx] = 0

        for i, g in enumerate(todo):
            inputs = self._inputs(ctx, params, [g])
            keep[g.name] = ctx.select({g.name: group_scores(model, g, inputs)}, {g.name: widths[g.name]})[g.name]
            removed = _removed(g, keep[g.name])
            if params.compensation != "none":
                compensate(model, g, inputs, removed)
            frozen += _zero_channels(model, g, removed)
            if steps:
                fit(model, _FirstBatches(ctx.data.train, steps, cfg.batch_size), None,
                    dataclasses.replace(cfg, epochs=1, warmup_epochs=0.0, seed=cfg.seed + i), ctx.device,
                    Callbacks(after_backward=hold_at_zero), teacher)
            log.info("fsm: %s keeps %d of %d channels (%d fine-tuning steps)", g.name, widths[g.name], g.channels, steps)
        info["layerwise_steps_per_group"] = steps
        return keep


def _removed(g: ChannelGroup, kept: Sequence[int]) -> list[int]:
    kept_set = set(kept)
    return [c for c in range(g.channels) if c not in kept_set]
