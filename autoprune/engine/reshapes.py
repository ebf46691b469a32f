"""Reshapes that mix the channel dimension, which Torch-Pruning's index mapping cannot follow.

Torch-Pruning maps channel indices through a flatten ``(N, C, H, W) -> (N, C*H*W)`` and its inverse,
and passes every other view/reshape through unchanged. A channel shuffle (ShuffleNet:
``view(N, g, C/g, H, W).transpose(1, 2).view(N, C, H, W)``), ``pixel_shuffle`` or a view that splits
the channels into heads permutes or merges channel indices, so a group crossing one would be cut
at the wrong indices, and Torch-Pruning 1.6.1 even divides by zero on some of them
(VainF/Torch-Pruning#14). :func:`watch_reshapes` records, during the forward Torch-Pruning traces,
the autograd node of every such op (a ``TorchFunctionMode``, so functional calls and tensor
methods are both seen) and keeps Torch-Pruning from mapping indices through them; the graph then
marks every group that crosses one unprunable, with the op and its shapes as the reason.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_ALWAYS_MIXING = {"pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"}


def _mixes_channels(name: str, src: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether a reshape of ``src`` (N, C, ...) into ``out`` moves channel indices in a way other than
    keeping dim 1, flattening everything after the batch, or unflattening a (N, F) tensor."""
    if name in _ALWAYS_MIXING:
        return True
    a, o = tuple(src.shape), tuple(out.shape)
    if a == o or src.dim() < 2 or out.dim() < 2 or a[0] != o[0]:
        return a != o and src.dim() >= 2 and out.dim() >= 2
    if a[:2] == o[:2]:
        return False  # only the dimensions after the channels change
    if out.dim() == 2 and o[1] == math.prod(a[1:]):
        return False  # flatten: Torch-Pruning maps it
    return not (src.dim() == 2 and math.prod(o[1:]) == a[1])  # unflatten of features: mapped too


class _Watch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: dict[Any, str] = {}  # autograd node -> "view (1, 24, 8, 8) -> (1, 2, 12, 8, 8)"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if (name in _RESHAPES or name in _ALWAYS_MIXING) and args and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor) and out.grad_fn is not None \
                and _mixes_channels(name, args[0], out):
            self.found[out.grad_fn] = f"{name} {tuple(args[0].shape)} -> {tuple(out.shape)}"
        return out


@contextlib.contextmanager
def watch_reshapes() -> Iterator[_Watch]:
    """Yields a mode: forwards run ``with mode:`` record channel-mixing reshapes in ``mode.found``
    (autograd node -> description); while the block lasts, Torch-Pruning maps no indices through them
    (nor through any reshape whose mapping raises, which is recorded too)."""
    from torch_pruning.dependency import index_mapping

    watch = _Watch()
    original_reshape = index_mapping.update_reshape_index_mapping
    original_update = index_mapping.update_index_mapping

    def guarded(graph: Any, node: Any) -> None:
        if node.grad_fn in watch.found:
            return
        try:
            original_reshape(graph, node)
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning cannot map this reshape: treat it as mixing
            watch.found[node.grad_fn] = f"a reshape Torch-Pruning cannot map ({type(exc).__name__})"

    def update(graph: Any) -> None:  # runs after the traced forward: every mixing reshape is known
        for node in list(graph.module2node.values()):
            if node.grad_fn in watch.found:
                _cut_after(node)
        original_update(graph)

    index_mapping.update_reshape_index_mapping = guarded
    index_mapping.update_index_mapping = update
    try:
        yield watch
    finally:
        index_mapping.update_reshape_index_mapping = original_reshape
        index_mapping.update_index_mapping = original_update


def _cut_after(node: Any) -> None:
    """Detach ``node`` from the nodes reading its output: channel indices are not followed past it.
    Groups reaching it from its input still contain it (and are marked unprunable); the channels
    after it belong to no group, so no layer reading them is cut."""
    for out in list(node.outputs):
        node.dependencies = [d for d in node.dependencies if d.target is not out]
        out.dependencies = [d for d in out.dependencies if d.target is not node]
        out.inputs = [n for n in out.inputs if n is not node]
    node.outputs = []
