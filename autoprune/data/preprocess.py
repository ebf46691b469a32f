"""The input recipe of a model: how raw data becomes the tensor the model was trained on.

An exported model is only usable with its preprocessing. autoprune standardises inputs per
channel with train-split statistics *after* scaling raw values (digits pixels 0..16 are divided
by 16, 8-bit images by 255); mean and std alone reproduce nothing (raw digits with the stated
mean/std gave 64 % test accuracy instead of 98.6 %). :class:`InputRecipe` holds the whole recipe,
is written into every export (ONNX ``metadata_props``, TorchScript extra files, and a JSON file
beside the export) and can be applied to raw arrays with :meth:`InputRecipe.apply`:

    x = resize_bilinear(raw * scale, (height, width)) if resize else raw * scale   # NCHW float32
    x[:, c] = (x[:, c] - mean[c]) / std[c]
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..errors import AutopruneError

FORMAT = "autoprune.input_recipe/1"
META_PREFIX = "autoprune.input."  # ONNX metadata_props keys: autoprune.input.<field>, JSON values

# What "raw" means for each source, and the factor that maps it to [0, 1] (autoprune.data.datasets).
_RAW = {
    "digits": (1 / 16, "sklearn.datasets.load_digits().images: float 0..16, N x 8 x 8"),
    "mnist": (1 / 255, "torchvision MNIST .data: uint8 0..255, N x 28 x 28"),
    "fashionmnist": (1 / 255, "torchvision FashionMNIST .data: uint8 0..255, N x 28 x 28"),
    "cifar10": (1 / 255, "torchvision CIFAR10 .data: uint8 0..255, N x 32 x 32 x 3 (HWC)"),
    "cifar100": (1 / 255, "torchvision CIFAR100 .data: uint8 0..255, N x 32 x 32 x 3 (HWC)"),
    "imagefolder": (1 / 255, "RGB image files decoded to uint8 0..255, H x W x 3, any size (resize first)"),
    "synthetic": (1.0, "autoprune's generated float images, N x 3 x H x W"),
}


@dataclass(frozen=True)
class InputRecipe:
    """Raw data -> model input. Shapes: the model takes ``layout`` (N, channels, height, width) float32."""

    channels: int
    height: int
    width: int
    scale: float                       # raw values are multiplied by this first (1/16 digits, 1/255 uint8)
    mean: tuple[float, ...]            # per channel, subtracted after scaling
    std: tuple[float, ...]             # per channel, divided after subtracting the mean
    classes: tuple[str, ...] = ()      # output index -> class name, where the data set has names
    resize: str = ""                   # "" or "bilinear": resize raw images to height x width (antialiased)
    layout: str = "NCHW"
    dtype: str = "float32"
    raw: str = ""                      # what the raw data is (source, value range, shape)
    data: str = ""                     # the data set name (autoprune.data.datasets.DataSpec.name)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise AutopruneError(f"input recipe has {len(self.mean)} means and {len(self.std)} stds for "
                                 f"{self.channels} channels; re-export the model")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["classes"] = list(self.mean), list(self.std), list(self.classes)
        d["formula"] = "x = raw * scale (NCHW, resized to height x width if resize); x[:, c] = (x[:, c] - mean[c]) / std[c]"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputRecipe:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in ("channels", "height", "width", "scale", "mean", "std") if n not in d)
        if missing:
            raise AutopruneError(f"input recipe lacks {', '.join(missing)}; re-export the model with autoprune")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})

    def to_metadata(self) -> dict[str, str]:
        """``autoprune.input.<field>`` -> JSON text, for ONNX metadata_props / TorchScript extra files."""
        return {META_PREFIX + k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> InputRecipe:
        """The recipe from an export's metadata (the inverse of :meth:`to_metadata`)."""
        d = {k[len(META_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}
        if not d:
            raise AutopruneError("the file has no autoprune input recipe (autoprune.input.* metadata); "
                                 "re-export it with `autoprune export`")
        return cls.from_dict(d)

    def apply(self, raw: Any) -> np.ndarray:
        """Raw images -> float32 ``(N, channels, height, width)`` model input.

        ``raw``: ``(N, H, W)`` (one channel), ``(N, H, W, C)`` (channels last) or ``(N, C, H, W)``.
        Raises AutopruneError when the channels or (without ``resize``) the size do not match.
        """
        x = np.asarray(raw)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise AutopruneError(f"raw images have shape {x.shape}; expected N,H,W or N,H,W,C or N,C,H,W")
        if x.shape[1] != self.channels and x.shape[-1] == self.channels:
            x = np.transpose(x, (0, 3, 1, 2))
        if x.shape[1] != self.channels:
            raise AutopruneError(f"raw images have shape {x.shape}; the model takes {self.channels} channels")
        x = x.astype(np.float64) * self.scale
        if x.shape[2:] != (self.height, self.width):
            if not self.resize:
                raise AutopruneError(f"raw images are {x.shape[2]}x{x.shape[3]}; the model takes "
                                     f"{self.height}x{self.width}")
            import torch
            import torch.nn.functional as F

            x = F.interpolate(torch.from_numpy(x).float(), size=(self.height, self.width), mode="bilinear",
                              align_corners=False, antialias=True).double().numpy()
        mean = np.asarray(self.mean).reshape(1, -1, 1, 1)
        std = np.asarray(self.std).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32)


def recipe_for(data: Any) -> InputRecipe:
    """The recipe of an :class:`autoprune.data.datasets.Dataset` (its spec, shape, train statistics, classes)."""
    name = data.spec.name
    key = name.split(":", 1)[0].lower()
    scale, raw = _RAW.get(key, (1.0, ""))
    if key == "npz":
        scale, raw = _npz_scale(name[len("npz:"):])
    resize = "bilinear" if key == "imagefolder" or data.spec.image_size is not None else ""
    return InputRecipe(channels=data.in_channels, height=data.image_size, width=data.image_size, scale=scale,
                       mean=tuple(data.mean), std=tuple(data.std), classes=tuple(data.classes),
                       resize=resize, raw=raw, data=name)


def _npz_scale(path: str) -> tuple[float, str]:
    """npz arrays: uint8 images are divided by 255 (autoprune.data.datasets._npz), other numbers used as they are."""
    try:
        with np.load(os.path.expanduser(path), allow_pickle=False) as arrays:
            dtype = arrays["x"].dtype
    except Exception:  # noqa: BLE001 - the file was readable when the model trained; say what we know
        return 1.0, f"the x array of {path} (dtype unknown now: if it was uint8, scale is 1/255)"
    return (1 / 255 if dtype == np.uint8 else 1.0), f"the x array of {path}: {dtype}"
