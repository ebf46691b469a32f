"""Training augmentation: which augmentations suit a data set, and applying them to a batch on its device.

Only augmentations that keep the class are used by default (see ``_DEFAULT_AUGMENTATION``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AutopruneError

AUGMENTATIONS = ("crop", "flip")
# Per data set: horizontal flips only where a mirrored image keeps its class. Digits and other
# characters do not (a mirrored 2, 3, 7 or 9 is no digit, and flips were 37 of 64 images of a
# batch on 28x28 MNIST), and the synthetic set's classes are fixed colour patterns that a flip
# turns into another pattern. Natural photos (CIFAR, ImageNet-style folders) and garments
# (Fashion-MNIST: a mirrored shirt or shoe is still one) keep their class, as in the standard
# CIFAR recipe (He et al. 2016: 4-px padded random crop + flip). npz arrays are unknown: crop only.
_DEFAULT_AUGMENTATION = {"digits": ("crop",), "mnist": ("crop",), "synthetic": ("crop",), "npz": ("crop",),
                         "fashionmnist": ("crop", "flip"), "cifar10": ("crop", "flip"),
                         "cifar100": ("crop", "flip"), "imagefolder": ("crop", "flip")}


def default_augmentation(data_name: str) -> tuple[str, ...]:
    """The augmentations that suit data set ``data_name`` (see ``_DEFAULT_AUGMENTATION``); crop when unknown."""
    key = data_name.split(":", 1)[0].lower()
    return _DEFAULT_AUGMENTATION.get(key, ("crop",))


def parse_augmentation(value: str | bool | Sequence[str] | None, data_name: str) -> tuple[str, ...]:
    """``"auto"``/True -> the data set's default; ``"none"``/False/None -> (); ``"crop,flip"`` -> checked names.

    Raises AutopruneError naming the unknown augmentation and the known ones.
    """
    if value is None or value is False:
        return ()
    if value is True or (isinstance(value, str) and value.strip().lower() == "auto"):
        return default_augmentation(data_name)
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise AutopruneError(f"unknown augmentation {unknown[0]!r}; use auto, none or a comma-separated list "
                             f"of {', '.join(AUGMENTATIONS)} (e.g. crop,flip)")
    return names


def augment_batch(x: Tensor, generator: torch.Generator | None = None,
                  ops: bool | Sequence[str] = True) -> Tensor:
    """Random crop (zero padding ``size // 8`` clipped to 1..4: 4 from 32 px, 1 at 8 px) and/or h-flip.

    ``ops``: names from :data:`AUGMENTATIONS` (see :func:`default_augmentation` for what suits a
    data set), or True for the legacy rule (crop, plus flips for images of at least 16 px).
    Vectorised on ``x``'s device; the random numbers come from ``generator`` (CPU or the same device).
    """
    n, _, h, w = x.shape
    if ops is True:
        ops = ("crop", "flip") if min(h, w) >= 16 else ("crop",)
    ops = tuple(ops or ())
    gdev = generator.device if generator is not None else "cpu"
    out = x
    if "crop" in ops:
        pad = min(4, max(1, min(h, w) // 8))
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gdev).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (n, h)
        cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (n, c, h, w)
    if "flip" in ops:
        flip = torch.rand(n, generator=generator, device=gdev).to(x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()
