"""One data split everywhere: a hash of the train/val/test indices, recorded in every checkpoint.

The split is fixed by the data seed (``DataSpec.seed``), never by a training seed. Every checkpoint
records the hash of the split its model was trained and measured on (``"split_hash"``); a search or a
retrain on another split would report validation or test accuracy on images the base trained on, so
:func:`check_split` makes that an error naming both splits. A user who knows the base never saw the
data (a model trained elsewhere) re-stamps it on purpose with ``autoprune import --allow-split-mismatch``.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import AutopruneError

log = logging.getLogger(__name__)

_KNOWN: dict[Any, str] = {}  # DataSpec -> split hash of the data loaded for it in this process


def _indices(split: Any) -> np.ndarray | None:
    """Rows of the source data a split holds (None: a fixed official split, e.g. torchvision's test set)."""
    idx = getattr(split, "indices", None)
    if idx is None:
        idx = getattr(getattr(split, "dataset", None), "indices", None)  # LoaderSplit over a Subset
    if idx is None:
        return None
    return np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)


def hash_splits(train: Any, val: Any, test: Any) -> str:
    """16 hex digits of SHA-256 over the three splits' source indices (sizes where there are none)."""
    h = hashlib.sha256()
    for label, split in (("train", train), ("val", val), ("test", test)):
        idx = _indices(split)
        h.update(label.encode())
        if idx is None:
            h.update(f"fixed:{len(split)}".encode())
        else:
            h.update(np.ascontiguousarray(np.sort(idx)).tobytes())
    return h.hexdigest()[:16]


def remember(spec: Any, split_hash: str) -> None:
    """Record the hash of ``spec``'s split so saving a checkpoint with only the spec can store it."""
    _KNOWN[spec] = split_hash


def split_hash_of(data: Any) -> str | None:
    """The split hash of a loaded Dataset, or of a DataSpec loaded earlier in this process (else None)."""
    found = getattr(data, "split_hash", None)
    if found:
        return found
    spec = getattr(data, "spec", data)
    try:
        return _KNOWN.get(spec)
    except TypeError:  # an unhashable dict
        return None


def describe(ckpt_data: Mapping[str, Any] | None, split_hash: str | None) -> str:
    if not ckpt_data:
        return f"an unrecorded data set (split {split_hash or 'unknown'})"
    keys = ("name", "seed", "val_fraction", "test_fraction")
    what = ", ".join(f"{k}={ckpt_data[k]!r}" for k in keys if k in ckpt_data)
    return f"{what} (split {split_hash or 'not recorded'})"


def check_split(ckpt: Mapping[str, Any], data: Any, label: str, allow_mismatch: bool = False) -> None:
    """Raise ``AutopruneError`` if checkpoint ``ckpt`` (named ``label``) was made on another split than ``data``.

    ``data`` is a loaded :class:`~autoprune.data.datasets.Dataset`. Compares split hashes when both exist;
    for an older checkpoint without one, compares the split-defining fields of the data specs
    (name, seed, fractions, image size). ``allow_mismatch`` turns the error into a warning.
    """
    spec = getattr(data, "spec", data)
    want = split_hash_of(data)
    have = ckpt.get("split_hash")
    saved = ckpt.get("data") or None
    now = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec or {})
    if have and want:
        same = have == want
    elif saved:
        keys = ("name", "seed", "val_fraction", "test_fraction", "image_size")
        same = all(saved.get(k) == now.get(k) for k in keys)
    else:
        return  # nothing recorded: nothing to compare
    if same:
        return
    message = (f"{label} was made on the data split {describe(saved, have)}, but this run uses "
               f"{describe(now, want)}: its validation/test images may be in the base's training data. "
               "Use the same data seed and fractions as the base, or, if the base never saw this data, "
               "re-stamp it with `autoprune import --checkpoint BASE --data ... --allow-split-mismatch`")
    if allow_mismatch:
        log.warning("%s (allowed by --allow-split-mismatch)", message)
        return
    raise AutopruneError(message)
