"""Model registry: built-in CIFAR networks, any ``torchvision:<name>`` or ``timm:<name>``, user
``package.module:function``.

A ``package.module:function`` name imports code, so it resolves only when the user trusts the module
where autoprune runs (``--trust-code``, ``AUTOPRUNE_TRUST_CODE`` or ``trust_code=``; see
:mod:`autoprune.trust`), never because a checkpoint or spec names it.

A model is described by a :class:`ModelSpec` (plain data, stored in checkpoints) and built by
:func:`create_model`. Registry factories have the signature
``fn(num_classes, in_channels, image_size) -> nn.Module``; add one with :func:`register`::

    @register("my_net")
    def my_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module: ...

Weights are never downloaded: every model starts from its random initialisation.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from ..errors import AutopruneError, did_you_mean
from ..trust import TrustCode, accepts_trust_code, check_name
from . import zoo

logger = logging.getLogger(__name__)

Factory = Callable[[int, int, int], nn.Module]
_REGISTRY: dict[str, Factory] = {}

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an architecture (not its weights)."""

    name: str  # registry name, "torchvision:<name>", "timm:<name>", or "package.module:function"
    num_classes: int
    in_channels: int
    image_size: int  # H == W of inputs
    output: int | str | None = None  # which output is the logits (autoprune.models.outputs); None: the rule

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise AutopruneError(f"model name must be a non-empty string, got {self.name!r}")
        for key in ("num_classes", "in_channels", "image_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutopruneError(f"model {key} must be a positive integer, got {value!r}")
        from .outputs import parse_selector

        object.__setattr__(self, "output", parse_selector(self.output))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["output"] is None:  # checkpoints of models following the default rule stay as they were
            del d["output"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d) - {"output"})
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise AutopruneError(
                f"bad model spec {d!r}: missing keys {missing}, unknown keys {unknown}; "
                f"expected exactly {sorted(names)}"
            )
        return cls(**{k: d[k] for k in names if k in d})


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator adding ``fn(num_classes, in_channels, image_size) -> nn.Module`` as ``name``."""
    if ":" in name:
        raise ValueError(f"registry names cannot contain ':' (reserved for prefixes): {name!r}")

    def decorator(fn: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            logger.warning("model %r registered again; the new factory replaces the old one", name)
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Registry names, sorted (the ``torchvision:`` and ``module:function`` forms are not listed)."""
    return sorted(_REGISTRY)


@accepts_trust_code
def create_model(spec: ModelSpec, *, trust_code: TrustCode = None) -> nn.Module:
    """Build the (randomly initialised) model described by ``spec``.

    ``trust_code``: modules a ``package.module:function`` name may import (see :mod:`autoprune.trust`);
    an untrusted one raises ``TrustError`` before anything is imported."""
    name = spec.name
    if name in _REGISTRY:
        model = _REGISTRY[name](spec.num_classes, spec.in_channels, spec.image_size)
    elif name.startswith(TORCHVISION_PREFIX):
        model = _torchvision_model(name[len(TORCHVISION_PREFIX):], spec)
    elif name.startswith(TIMM_PREFIX):
        model = _timm_model(name[len(TIMM_PREFIX):], spec)
    elif ":" in name:
        model = _user_model(name, spec)
    else:
        raise AutopruneError(
            f"unknown model {name!r}: {did_you_mean(name, list_models())}; "
            "or use torchvision:<name>, timm:<name> or package.module:function"
        )
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model {name!r}: the factory returned {type(model).__name__}, not an nn.Module")
    check_float32(model, f"model {name!r}")
    if spec.output is not None:
        from .outputs import set_output

        set_output(model, spec.output)
    return model


def check_float32(model: nn.Module, label: str) -> None:
    """AutopruneError naming the dtype when ``model`` has floating-point parameters other than float32."""
    import torch

    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise AutopruneError(f"{label} has {', '.join(dtypes)} parameters; autoprune traces, prunes and trains "
                             "float32 models: build it in float32 (model.float()); mixed precision is applied "
                             "on the GPU during training")


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the layer producing the logits: the last ``nn.Linear``, or the last
    ``nn.Conv2d`` for fully convolutional classifiers (SqueezeNet). It is never pruned."""
    for kind in (nn.Linear, nn.Conv2d):
        last = None
        for qualified, module in model.named_modules():
            if isinstance(module, kind):
                last = qualified
        if last is not None:
            return last
    raise AutopruneError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer: nothing autoprune can prune")


# --------------------------------------------------------------------------- prefixed forms


def _torchvision_model(tv_name: str, spec: ModelSpec) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if tv_name not in known:
        raise AutopruneError(
            f"unknown torchvision classification model {tv_name!r}: {did_you_mean(tv_name, known)}"
        )
    try:
        model = torchvision.models.get_model(tv_name, weights=None, num_classes=spec.num_classes)
    except (TypeError, ValueError) as exc:
        raise AutopruneError(f"torchvision:{tv_name} could not be built: {exc}") from exc
    if spec.in_channels != 3:
        _replace_input_conv(model, spec.in_channels, f"torchvision:{tv_name}")
    return model


def _timm_model(timm_name: str, spec: ModelSpec) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` for the spec's classes and input channels (timm sets
    both itself); never downloads. timm is an optional extra: ``pip install 'autoprune[timm]'``."""
    try:
        import timm
    except ImportError:
        raise AutopruneError(f"model timm:{timm_name} needs timm: pip install 'autoprune[timm]' (or pip install "
                             "timm)") from None
    if not timm.is_model(timm_name):
        raise AutopruneError(f"unknown timm model {timm_name!r}: {_timm_hint(timm, timm_name)}")
    try:
        return timm.create_model(timm_name, pretrained=False, num_classes=spec.num_classes,
                                 in_chans=spec.in_channels)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise AutopruneError(f"timm:{timm_name} could not be built for {spec.num_classes} classes, "
                             f"{spec.in_channels} input channels: {type(exc).__name__}: {exc}") from None


def _timm_hint(timm: Any, name: str) -> str:
    import difflib

    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}timm has {len(known)} models; list them with python -c \"import timm; print(timm.list_models())\""


def _replace_input_conv(model: nn.Module, in_channels: int, label: str) -> None:
    """Swap the first conv (the one reading the image) for an identical one with ``in_channels``."""
    for qualified, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise AutopruneError(f"{label} has no Conv2d whose input channels could be set to {in_channels}")
    if conv.groups != 1:
        raise AutopruneError(f"{label}: the first conv {qualified!r} is grouped; cannot change its inputs")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_name, _, attr = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _user_model(name: str, spec: ModelSpec) -> nn.Module:
    module_name = check_name(name)  # TrustError unless the user trusts the module: nothing is imported
    fn_name = name.partition(":")[2]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing user code
        raise AutopruneError(
            f"model {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "check that it is on PYTHONPATH"
        ) from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise AutopruneError(f"model {name!r}: module {module_name!r} has no function {fn_name!r}")
    return fn(num_classes=spec.num_classes, in_channels=spec.in_channels, image_size=spec.image_size)


# --------------------------------------------------------------------------- built-in registry


def _register_cifar_resnets() -> None:
    for depth in (20, 32, 56, 110):
        for suffix, shortcut in (("", "B"), ("_a", "A")):

            def factory(num_classes: int, in_channels: int, image_size: int, *, _d=depth, _s=shortcut):
                return zoo.cifar_resnet(_d, num_classes, in_channels, _s)

            factory.__name__ = f"resnet{depth}{suffix}"
            factory.__doc__ = f"CIFAR ResNet-{depth}, option-{shortcut} shortcuts."
            register(f"resnet{depth}{suffix}")(factory)


_register_cifar_resnets()


@register("vgg16_bn")
def vgg16_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """VGG-16 with BatchNorm, CIFAR variant (global average pool + one Linear)."""
    return zoo.CifarVGG(zoo.VGG16_CFG, num_classes, in_channels, image_size)


@register("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """MobileNetV2 width 1.0, CIFAR variant (stride-1 stem and first two stride-2 stages)."""
    return zoo.CifarMobileNetV2(num_classes, in_channels)


@register("small_cnn")
def small_cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Four-conv CNN for 8x8..32x32 images, Linear after Flatten."""
    return zoo.SmallCNN(num_classes, in_channels, image_size)
