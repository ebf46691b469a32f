"""Moments of what each layer reads: per-channel mean and variance carried from BNs to consumers.

Used by FSM (:mod:`autoprune.methods.fsm`) to estimate the expected value of every input channel of
every consumer without data (the Gaussian model of the BN output, traced with ``torch.fx``), or
from a few calibration batches. The approximations are listed in fsm.py's docstring.
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.cost import is_depthwise
from ..engine.graph import ChannelGroup
from ..engine.trace import direct_bns

log = logging.getLogger(__name__)

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
    no_bn: list[str] = field(default_factory=list)  # fallback consumers whose group has no BN: mean is a placeholder
    measured: list[str] = field(default_factory=list)  # consumers whose mean was measured on calibration batches
    unmodelled: list[str] = field(default_factory=list)  # consumers with a placeholder mean: never compensated


class _Propagate(fx.Interpreter):
    """Runs the traced model on a dummy input, carrying BN moments alongside (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, watch: set[str]) -> None:
        super().__init__(gm)
        self.mods = dict(gm.named_modules())
        self.watch = watch
        self.moments: dict[fx.Node, Moments | None] = {}
        self.shapes: dict[fx.Node, torch.Size] = {}
        self.seen: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_module" and n.target in self.watch and n.target not in self.seen:
            m = self._in(n.args[0])
            if m is not None:
                self.seen[n.target] = m[0]
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
            if isinstance(mod, nn.Conv2d) and is_depthwise(mod) and x is not None:
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


def fallback_mean(model: nn.Module, g: ChannelGroup) -> Tensor:
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
            seen = trace.seen
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "use the fallback"
            log.info("fsm: cannot trace %s (%s); using the BN-sum approximation", type(model).__name__,
                     type(exc).__name__)
    consumers = {c for g in groups for c in g.consumers}
    out.bn_after = {c: bn for c, bn in direct_bns(model, input_shape).bn_of.items() if c in consumers}
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
                fb = fallback_mean(model, g) if fb is None else fb
                vec[idx] = torch.where(torch.isnan(vals), fb[:, None].expand_as(vals), vals)
                out.fallback.append(c)
                if not g.bns:
                    out.no_bn.append(c)
            out.mean[c] = vec
    out.fallback, out.no_bn = sorted(set(out.fallback)), sorted(set(out.no_bn))
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
