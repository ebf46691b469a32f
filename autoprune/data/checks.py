"""Checks of a data set's arrays on load, each failing with one line that names the data set.

Called by :mod:`autoprune.data.datasets` for every in-memory data set (``npz:``, digits, synthetic): pixel
values must be finite (a NaN would surface much later as "loss became nan", an inf would train
silently), there must be enough samples for a train / val / test split, at least two classes, and
labels must be class indices (a stray label of 100000 would otherwise make a 100001-way classifier).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import AutopruneError

MIN_SAMPLES = 10  # fewer cannot give a train, a validation and a test split worth the name


def check_tensors(name: str, x: Tensor, y: Tensor, num_classes: int) -> None:
    """Raise AutopruneError naming ``name`` when ``x`` (N, C, H, W) or ``y`` (N,) cannot be trained on."""
    n = int(y.shape[0])
    if n < MIN_SAMPLES:
        raise AutopruneError(f"data set {name!r} has {n} samples; at least {MIN_SAMPLES} are needed for a "
                             "train / val / test split")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = ~finite.flatten(1).all(dim=1)
        kinds = " and ".join(k for k, m in (("NaN", torch.isnan(x)), ("inf", torch.isinf(x))) if bool(m.any()))
        raise AutopruneError(f"data set {name!r}: x holds {kinds} values in {int(bad.sum())} of {n} samples "
                             f"(first: sample {int(bad.nonzero()[0])}); replace or drop them before training")
    labels = torch.unique(y)
    if len(labels) < 2:
        raise AutopruneError(f"data set {name!r} has one class ({int(labels[0])}) only; a classifier needs at "
                             "least two")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise AutopruneError(f"data set {name!r}: labels run from {low} to {high}, outside 0..{num_classes - 1}")
    if high + 1 > 2 * len(labels):
        raise AutopruneError(f"data set {name!r} has {len(labels)} distinct labels but the largest is {high}; "
                             f"labels must be class indices 0..K-1 (remap them, e.g. with numpy.unique(y, "
                             "return_inverse=True))")


def unreadable(exc: BaseException) -> str:
    """Why an .npz could not be read, without numpy's advice to allow pickles (never do that for data)."""
    text = str(exc)
    if "pickle" in text.lower() or isinstance(exc, (EOFError, OSError)) or "zip" in type(exc).__name__.lower():
        return ("is not a readable .npz (a zip of .npy arrays; it may be truncated or another format); re-save "
                "it with numpy.savez(path, x=images, y=labels)")
    return f"could not be read ({type(exc).__name__}: {' '.join(text.split())[:200]})"
