"""What a model costs: MACs, parameters, latency, and the analytic MACs of a width assignment.

Unit convention (DESIGN.md section 3): we count multiply-accumulates (MACs) of convolutions
(1-d, 2-d, 3-d and transposed) and linear layers for one input sample and always call them "MACs";
FLOPs = 2 x MACs. BatchNorm, activations, pooling and additions are not counted (they are folded or
negligible and are not counted by the papers we compare with either). This is exactly half of what
``torch.utils.flop_counter.FlopCounterMode`` counts for a model whose matrix products all happen in
these modules; :func:`unattributed_macs` measures the rest (functional convolutions and matmuls).
A module called several times in forward is counted once per call.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

MAC_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # every module whose MACs we count


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution (``groups == in_channels == out_channels > 1``): each output channel reads
    its own input channel, so pruning ties its input to its output. The one home of this test."""
    return (isinstance(module, nn.modules.conv._ConvNd) and
            1 < module.groups == module.in_channels == module.out_channels)


def _positions(module: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    """Positions per sample at which the layer's weight is applied once (a transposed conv: its input's)."""
    if isinstance(module, nn.Linear):
        return out.numel() // out.shape[-1] // out.shape[0]
    if module.transposed:  # type: ignore[union-attr]
        x = inp[0]
        return x.numel() // x.shape[0] // x.shape[1]
    return out.numel() // out.shape[0] // out.shape[1]


def _kernel(module: nn.Module) -> int:
    return math.prod(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else 1


def _layer_macs(module: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return _positions(module, inp, out) * module.in_features * module.out_features
    per_position = module.in_channels * module.out_channels // module.groups * _kernel(module)
    return _positions(module, inp, out) * per_position


@torch.no_grad()
def _forward_with_hook(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device,
                       hook: Callable[[nn.Module, tuple, torch.Tensor], None]) -> None:
    """One eval-mode forward pass of a zero sample with ``hook`` on every conv and linear layer."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MAC_LAYERS)]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """MACs of convs and linears for one sample of shape ``input_shape`` (C, H, W), measured by hooks.

    Every ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose*d`` and ``nn.Linear`` call counts, in eval mode.
    """
    total = 0

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, inp, out)

    _forward_with_hook(model, input_shape, device, hook)
    return total


@torch.no_grad()
def reference_macs(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """Half of ``torch.utils.flop_counter.FlopCounterMode``'s FLOPs for one eval-mode sample: the reference
    :func:`count_macs` must equal when every convolution and matrix product happens in a module."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        model.eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def unattributed_macs(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """MACs torch counts that no conv or linear module accounts for (``F.conv2d``, ``torch.matmul`` ...)."""
    return reference_macs(model, input_shape, device) - count_macs(model, input_shape, device)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    repeats: int = 20,
    warmup: int = 5,
) -> float:
    """Median wall-clock milliseconds of one forward pass of a ``batch_size`` batch."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    times = []
    try:
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    return statistics.median(times)


@dataclass(frozen=True)
class LayerGeom:
    """Geometry of one conv or linear layer, recorded once from a forward pass of the base model."""

    name: str
    kind: str  # "conv" | "deconv" (transposed) | "linear"
    in_ch: int  # conv in_channels / linear in_features
    out_ch: int  # conv out_channels / linear out_features
    groups: int
    kernel: int  # kh * kw (1 for linear)
    positions: int  # per sample, summed over calls: output positions (Hout * Wout; input's for a deconv; rows)
    bias: bool
    depthwise: bool  # groups == in_ch == out_ch > 1: pruning keeps it depthwise
    calls: int = 1  # times forward calls the layer (a shared module: more than 1)

    def macs(self, in_ch: int, out_ch: int) -> int:
        if self.depthwise:
            return out_ch * self.kernel * self.positions
        return out_ch * (in_ch // self.groups) * self.kernel * self.positions

    def params(self, in_ch: int, out_ch: int) -> int:
        per_out = 1 if self.depthwise else in_ch // self.groups
        return out_ch * per_out * self.kernel + (out_ch if self.bias else 0)


@dataclass(frozen=True)
class Term:
    """``layer``'s ``dim`` loses ``mult`` channels for each channel removed from ``group``."""

    group: str
    layer: str
    dim: str  # "in" | "out"
    mult: int


class WidthObjective(Protocol):
    """What the allocator bisects against: a cost of a width assignment (group name -> kept channels).

    ``value(widths)`` is the cost with those widths (groups not named keep all channels), ``base`` the
    cost of the unpruned model, ``unit`` names it in messages ("MACs", "latency"). Must be monotone
    non-decreasing in every width. Implemented by :class:`WidthCost` (analytic MACs) and by latency
    models of a device.
    """

    unit: str

    @property
    def base(self) -> float: ...

    def value(self, widths: Mapping[str, int]) -> float: ...


class WidthCost:
    """Analytic MACs and parameters of a width assignment (group name -> kept channels).

    Each layer's channel counts are affine in the number of channels removed from each group,
    so MACs of any assignment take microseconds: this is what makes bisection in the allocator
    cheap. Built by :func:`autoprune.engine.graph.build_width_cost`.
    """

    def __init__(
        self,
        layers: list[LayerGeom],
        terms: list[Term],
        channels: Mapping[str, int],
        bn_channels: Mapping[str, int],
        base_params: int,
    ) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.channels = dict(channels)
        self._terms: dict[str, list[Term]] = {}
        for t in terms:
            self._terms.setdefault(t.group, []).append(t)
        self._bn_channels = dict(bn_channels)  # group -> number of affine BN channels per group channel
        self.base_params = base_params
        self.base_macs = self.macs({})

    unit = "MACs"

    @property
    def base(self) -> float:
        """The base model's MACs (the :class:`WidthObjective` view)."""
        return float(self.base_macs)

    def value(self, widths: Mapping[str, int]) -> float:
        """MACs of ``widths`` (the :class:`WidthObjective` view)."""
        return float(self.macs(widths))

    def _shapes(self, widths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        shapes = {n: [g.in_ch, g.out_ch] for n, g in self.layers.items()}
        for group, width in widths.items():
            removed = self.channels[group] - int(width)
            if removed < 0:
                raise ValueError(f"group {group!r}: width {width} exceeds its {self.channels[group]} channels")
            if removed == 0:
                continue
            for t in self._terms.get(group, ()):
                shapes[t.layer][0 if t.dim == "in" else 1] -= removed * t.mult
        for n, g in self.layers.items():
            if g.depthwise:  # a depthwise conv's input and output channels are the same channels
                shapes[n][0] = shapes[n][1] = min(shapes[n])
        return {n: (s[0], s[1]) for n, s in shapes.items()}

    def layer_shapes(self, widths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """Per conv / linear layer, its (input, output) channels when the groups keep ``widths``."""
        return self._shapes(widths)

    def macs(self, widths: Mapping[str, int]) -> int:
        """MACs for one sample when each group in ``widths`` keeps that many channels."""
        return sum(self.layers[n].macs(i, o) for n, (i, o) in self._shapes(widths).items())

    def macs_fraction(self, widths: Mapping[str, int]) -> float:
        return self.macs(widths) / self.base_macs

    def params(self, widths: Mapping[str, int]) -> int:
        """Parameters when each group keeps ``widths`` channels (conv, linear and BN affine params)."""
        delta = 0
        for n, (i, o) in self._shapes(widths).items():
            g = self.layers[n]
            delta += g.params(i, o) - g.params(g.in_ch, g.out_ch)
        for group, width in widths.items():
            delta -= 2 * self._bn_channels.get(group, 0) * (self.channels[group] - int(width))
        return self.base_params + delta

    def removal_cost(self, group: str, widths: Mapping[str, int]) -> int:
        """MACs saved by removing one more channel from ``group`` at ``widths``."""
        now = self.macs(widths)
        w = dict(widths)
        w[group] = w.get(group, self.channels[group]) - 1
        return now - self.macs(w)


@torch.no_grad()
def layer_geometry(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> list[LayerGeom]:
    """Record the geometry of every conv and linear layer by one forward pass (batch of 1).

    A layer called several times (a shared module) is one entry whose ``positions`` add up over the
    calls (MACs are linear in them) and whose ``calls`` says how often it ran.
    """
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, LayerGeom] = {}

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        name = names[module]
        positions = _positions(module, inp, out)
        if name in found:
            prev = found[name]
            found[name] = replace(prev, positions=prev.positions + positions, calls=prev.calls + 1)
        elif isinstance(module, nn.Linear):
            found[name] = LayerGeom(name, "linear", module.in_features, module.out_features, 1, 1, positions,
                                    module.bias is not None, False)
        else:
            dw = is_depthwise(module)
            kind = "deconv" if module.transposed else "conv"
            found[name] = LayerGeom(name, kind, module.in_channels, module.out_channels, module.groups,
                                    _kernel(module), positions, module.bias is not None, dw)

    _forward_with_hook(model, input_shape, device, hook)
    return list(found.values())
