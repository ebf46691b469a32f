"""What one forward pass tells us about a model before we group its channels.

:func:`trace_model` runs the model in eval mode and, where eval mode leaves a layer unused, in
training mode (BN statistics and the random state are restored) with hooks on every conv and linear layer, and finds:

- the **output layers**: the conv/linear layers whose outputs reach the model's outputs without
  passing another conv/linear, found by walking the autograd graph back from the outputs. They make
  the logits and are never pruned, whatever order they were registered in (an SE block built from
  ``nn.Linear`` before a 1x1-conv classifier, or a projection head registered after ``fc``);
- **shared layers**: layers forward calls more than once;
- **training-only layers**: layers that run only in training (an ``if self.training:`` auxiliary head);
  the training-mode pass runs only when eval mode leaves some conv/linear layer uncalled, and the
  model's buffers (BN statistics) are restored after it;
- **unattributed MACs**: what ``torch.utils.flop_counter.FlopCounterMode`` counts beyond our
  conv/linear hooks (functional ``F.conv2d``, ``torch.matmul``): a model with any is refused, since
  the analytic MACs of a width assignment could not include them.

:func:`direct_bns` finds the BatchNorm that directly reads each conv/linear layer.
:func:`safe_copy` deep-copies a model even when a module attribute holds a tensor with autograd
history (``copy.deepcopy`` refuses those).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AutopruneError
from .cost import MAC_LAYERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelTrace:
    """Facts about a model's forward pass (module names are qualified names)."""

    outputs: tuple[str, ...]  # layers producing the outputs (eval and training mode)
    calls: dict[str, int]  # layer -> calls per forward (the larger of eval and training mode)
    train_only: tuple[str, ...]  # layers that run in training mode only
    macs: int  # eval-mode MACs of conv/linear modules for one sample (of the constant probe)
    # eval-mode inputs that call different sets of layers (data-dependent branches), the constant probe first
    examples: tuple[torch.Tensor, ...] = ()
    never_ran: tuple[str, ...] = ()  # conv/linear layers that no traced input ran, in eval or training mode


def safe_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with tensors held as plain attributes detached first when they carry
    autograd history (torch refuses to deep-copy non-leaf tensors). Raises ``AutopruneError`` if the
    model still cannot be copied."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for value in (*vars(m).values(), *m._buffers.values()):
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise AutopruneError(f"{type(model).__name__} cannot be copied ({type(exc).__name__}: {first}); "
                             "keep only modules, parameters, buffers and plain values as attributes") from exc


def keep_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave the random state of the CPU (and of ``device`` if it is a GPU) as it was: tracing in
    training mode runs dropout, and grouping must not shift the seeds of what follows."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _tensors(obj: object) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _output_layers(out: object, producers: dict[object, str]) -> list[str]:
    """Layers whose autograd node is reached from ``out`` without passing another layer's node."""
    found: list[str] = []
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node in producers:
            if producers[node] not in found:
                found.append(producers[node])
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def _run(model: nn.Module, x: torch.Tensor, train: bool,
         count_flops: bool) -> tuple[dict[str, int], list[str], int, int]:
    """One forward of ``x``; returns (calls per layer, output layers, hooked MACs, FlopCounterMode MACs),
    MACs per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from .cost import _layer_macs

    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    producers: dict[object, str] = {}
    macs = 0

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        macs += _layer_macs(module, inp, out)
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            producers[out.grad_fn] = name

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MAC_LAYERS)]
    was_training = model.training
    batch, device, input_shape = x.shape[0], x.device, tuple(x.shape[1:])
    x = x.detach().clone().requires_grad_(True)
    counter = FlopCounterMode(display=False) if count_flops else None
    try:
        model.train(train)
        with torch.enable_grad(), keep_rng(device):
            if counter is not None:
                with counter:
                    out = model(x)
            else:
                out = model(x)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        mode = "training" if train else "eval"
        raise AutopruneError(f"{type(model).__name__} fails a forward pass in {mode} mode on a "
                             f"{'x'.join(map(str, input_shape))} input ({type(exc).__name__}: {first}); "
                             "check the model and the data's image size and channels") from exc
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    flops = int(counter.get_total_flops()) // 2 // batch if counter is not None else 0
    return calls, _output_layers(out, producers), macs // batch, flops


def check_forward(model: nn.Module, input_shape: Sequence[int]) -> None:
    """AutopruneError (one line: the mode, the input size, torch's message) if an eval-mode forward of a
    ``(C, H, W)`` input fails, e.g. a ViT built for 224 px given 32 px images; nothing else changes."""
    from ..models.registry import check_float32

    check_float32(model, type(model).__name__)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    _run(model, torch.ones(1, *input_shape, device=device), train=False, count_flops=False)


def trace_batches(data: Any, device: torch.device | str, batches: int = 2, batch_size: int = 16) -> list[torch.Tensor]:
    """The inputs of the first ``batches`` training batches of ``data`` (a Dataset; None -> []), unshuffled:
    the real inputs :func:`trace_model` runs besides its probes."""
    if data is None or getattr(data, "train", None) is None:
        return []
    out = []
    for x, _ in data.train.batches(batch_size, shuffle=False):
        out.append(x.to(device))
        if len(out) >= batches:
            break
    return out


def _probe_runs(model: nn.Module, x0: torch.Tensor, calls: dict[str, int], outputs: list[str],
                batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, int], list[str]]:
    """Run a seeded random probe and ``batches`` after the constant probe ``x0``; returns the inputs that
    called a new set of layers (``x0`` first), the largest call count per layer and every output layer."""
    g = torch.Generator().manual_seed(0)  # a local generator: tracing never moves the global seed
    noise = torch.randn(2, *x0.shape[1:], generator=g).to(x0.device)
    examples, seen = [x0], [frozenset(calls)]
    calls, outputs = dict(calls), list(outputs)
    for x in (noise, *batches):
        c, outs, _, _ = _run(model, x.to(x0.device), train=False, count_flops=False)
        outputs += [o for o in outs if o not in outputs]
        for n, k in c.items():
            calls[n] = max(calls.get(n, 0), k)
        if frozenset(c) not in seen:
            seen.append(frozenset(c))
            examples.append(x.to(x0.device))
    return examples, calls, outputs


def trace_model(model: nn.Module, input_shape: Sequence[int], batches: Sequence[torch.Tensor] = ()) -> ModelTrace:
    """Trace ``model`` on a ``(C, H, W)`` input in eval and training mode (see the module docstring).

    Besides the constant probe, a seeded random probe and ``batches`` (real inputs, see
    :func:`trace_batches`) run in eval mode: an input calling another set of layers (a branch chosen
    by the data) is kept in ``examples`` so the graph is built for it too; layers no input ran are
    ``never_ran``. Raises ``AutopruneError`` for a model without conv/linear layers, one that fails a
    forward pass, or one with MACs outside conv/linear modules.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise AutopruneError(f"{type(model).__name__} has no parameters: nothing autoprune can prune") from None
    from ..models.registry import check_float32

    check_float32(model, type(model).__name__)
    x0 = torch.ones(1, *input_shape, device=device)
    calls, outputs, macs, reference = _run(model, x0, train=False, count_flops=True)
    if not calls:
        raise AutopruneError(f"{type(model).__name__} has no nn.Conv or nn.Linear layer: nothing autoprune can prune")
    if reference != macs:
        raise AutopruneError(
            f"{type(model).__name__}: {reference - macs} of {reference} MACs (torch's FlopCounterMode) come from "
            "convolutions or matrix products outside nn.Conv*/nn.Linear modules (F.conv2d, torch.matmul ...); "
            "autoprune cannot tie them to channels: move them into modules")
    examples, calls, outputs = _probe_runs(model, x0, calls, outputs, batches)
    layers = {n for n, m in model.named_modules() if isinstance(m, MAC_LAYERS)}
    train_calls, train_outputs = calls, []
    if layers - set(calls):  # a layer eval mode never calls may run in training: trace that mode too
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BN statistics move in training
        try:
            x = torch.ones(2, *input_shape, device=device)  # BN in training mode needs two values per channel
            train_calls, train_outputs, _, _ = _run(model, x, train=True, count_flops=False)
        except AutopruneError as exc:  # pruning is judged in eval mode; do not refuse the model for this
            log.warning("%s; branches that run only in training are not traced", exc)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
    train_only = tuple(n for n in train_calls if n not in calls)
    merged = {n: max(calls.get(n, 0), train_calls.get(n, 0)) for n in {*calls, *train_calls}}
    outs = tuple(dict.fromkeys([*outputs, *train_outputs]))
    if not outs:  # outputs computed without autograd: fall back to the last layer registered
        from ..models.registry import classifier_name

        outs = (classifier_name(model),)
    if train_only:
        log.info("layers running only in training mode: %s", ", ".join(train_only))
    never_ran = tuple(n for n, m in model.named_modules() if isinstance(m, MAC_LAYERS) and n not in merged)
    return ModelTrace(outputs=outs, calls=merged, train_only=train_only, macs=macs, examples=tuple(examples),
                      never_ran=never_ran)


@dataclass(frozen=True)
class DirectBNs:
    """Which BatchNorm directly reads each conv/linear layer, from one eval-mode forward pass."""

    bn_of: dict[str, str]  # layer name -> the BN whose input is that layer's very output, unmodified
    calls: dict[str, int]  # conv/linear/BN name -> times forward called it


@torch.no_grad()
def direct_bns(model: nn.Module, input_shape: Sequence[int]) -> DirectBNs:
    """The BN that directly reads each conv/linear layer (nothing in between), and call counts.

    The one home of this question (ResRep's compactor sites, LRF's and FSM's compensation targets).
    A BN reads a layer directly when its input is the very tensor the layer returned, unmodified: an
    in-place op in between (``ReLU(inplace=True)``) bumps the tensor's version and does not count.
    Parameters, buffers and modes are unchanged.
    """
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, Any, int]] = {}
    found: dict[str, str] = {}
    calls: dict[str, int] = {}

    def after(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        calls[names[module]] = calls.get(names[module], 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[module], weakref.ref(out), out._version)

    def before(module: nn.Module, inp: tuple) -> None:
        calls[names[module]] = calls.get(names[module], 0) + 1
        hit = produced.get(id(inp[0])) if inp else None
        if hit is not None and hit[1]() is inp[0] and inp[0]._version == hit[2]:
            found[hit[0]] = names[module]

    hooks = [m.register_forward_hook(after) for m in model.modules() if isinstance(m, MAC_LAYERS)]
    hooks += [m.register_forward_pre_hook(before) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hk in hooks:
            hk.remove()
    return DirectBNs(found, calls)
