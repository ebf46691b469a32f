"""Data sets and deterministic train/val/test splits.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, offline), ``synthetic`` (generated from the
seed), ``npz:<path>`` (arrays ``x`` and ``y``), ``imagefolder:<dir>`` (torchvision ImageFolder) and
the torchvision sets ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist`` (downloaded into
``DataSpec.root``; MNIST and Fashion-MNIST are first looked for offline as idx files, see
:mod:`autoprune.data.idx`, e.g. from Debian's ``dataset-fashion-mnist`` package). Inputs are standardised per channel with statistics of the train split only.

Small sets are :class:`TensorSplit`: tensors held in memory (on the GPU when ``device`` is CUDA),
batched by slicing, augmented on the device. ImageFolder sets are :class:`LoaderSplit`: a
DataLoader over the files (both in :mod:`autoprune.data.split_types`). Splits never overlap and
are fully determined by ``DataSpec.seed``, the data (split) seed, which is separate from any
training seed; ``Dataset.split_hash`` fingerprints the split's indices and every checkpoint
records it (see :mod:`autoprune.data.splits`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AutopruneError, did_you_mean
from . import idx
from .augment import AUGMENTATIONS, augment_batch, default_augmentation, parse_augmentation
from .checks import check_tensors, unreadable
from .split_types import LoaderSplit, Split, TensorSplit, subset_split
from .splits import hash_splits, remember

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_ROOT",
    "DataSpec",
    "Dataset",
    "LoaderSplit",
    "Split",
    "TensorSplit",
    "augment_batch",
    "default_augmentation",
    "list_datasets",
    "load_data",
    "parse_augmentation",
    "split_indices",
    "subset_split",
]

logger = logging.getLogger(__name__)

TORCHVISION_SETS = ("cifar10", "cifar100", "mnist", "fashionmnist")
DEFAULT_ROOT = os.path.join("~", ".cache", "autoprune", "data")
SYNTHETIC_SAMPLES = 2000
SYNTHETIC_CLASSES = 10
SYNTHETIC_NOISE = 2.0


@dataclass(frozen=True)
class DataSpec:
    """Which data and how to split it; plain data, stored with checkpoints."""

    name: str  # "digits", "synthetic", "npz:<path>", "imagefolder:<dir>", "cifar10", "cifar100", ...
    seed: int = 0  # the split seed (and synthetic data's): fixes train/val/test; never the training seed
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # ignored by torchvision sets: their official test set is the test split
    image_size: int | None = None  # resize to this (imagefolder default 224)
    root: str | None = None  # download/cache dir for torchvision sets

    def __post_init__(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise AutopruneError(f"data {key} must be in [0, 1), got {value!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise AutopruneError(f"data val_fraction + test_fraction must be < 1 (got {self.val_fraction} + "
                                 f"{self.test_fraction}); leave samples for training")
        if self.image_size is not None and self.image_size < 1:
            raise AutopruneError(f"data image_size must be a positive integer, got {self.image_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown or "name" not in d:
            raise AutopruneError(f"bad data spec {d!r}: unknown keys {unknown}; known keys {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class Dataset:
    """Three splits plus the input/label shape a model must match."""

    spec: DataSpec
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] = ()  # per-channel standardisation (train stats), for inference elsewhere
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()  # class names where the source has them
    split_hash: str = ""  # fingerprint of the train/val/test indices (set by load_data)


# --------------------------------------------------------------------------- split helpers


def split_indices(y: np.ndarray, seed: int, val_fraction: float, test_fraction: float):
    """Stratified, seeded (train, val, test) index arrays; exact sizes ``round(fraction * n)``.

    Samples are shuffled, then ordered by their relative rank within their class, so every
    prefix of the order holds the classes in (almost) their overall proportions; test takes the
    first ``n_test``, val the next ``n_val``, train the rest.
    """
    n = len(y)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    ys = np.asarray(y)[perm]
    rank = np.zeros(n, dtype=np.float64)
    for c in np.unique(ys):
        where = np.flatnonzero(ys == c)
        rank[where] = (np.arange(len(where)) + 0.5) / len(where)
    order = perm[np.argsort(rank, kind="stable")]
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    if n - n_test - n_val < 1:
        raise AutopruneError(f"data set of {n} samples leaves no training samples after the val/test splits")
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return np.sort(train), np.sort(val), np.sort(test)


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of an NCHW float tensor (std of constant channels -> 1)."""
    xt = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean, std = xt.mean(1), xt.std(1)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _tensor_dataset(spec: DataSpec, x: Tensor, y: Tensor, device: torch.device, num_classes: int,
                    classes: tuple[str, ...] = ()) -> Dataset:
    """Split float NCHW ``x`` by the seed, standardise with the train split's stats, move to device."""
    check_tensors(spec.name, x, y, num_classes)  # finite, enough samples, >= 2 classes, labels in range
    if spec.image_size is not None:
        x = _resize(x, spec.image_size)
    if x.shape[-1] != x.shape[-2]:
        raise AutopruneError(
            f"data set {spec.name!r} has non-square {x.shape[-2]}x{x.shape[-1]} images; set image_size to resize"
        )
    tr, va, te = split_indices(y.numpy(), spec.seed, spec.val_fraction, spec.test_fraction)
    mean, std = _channel_stats(x[tr])
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    x, y = x.contiguous(), y.long()

    def make(idx: np.ndarray) -> TensorSplit:
        i = torch.from_numpy(idx)
        return TensorSplit(x[i].to(device), y[i].to(device), indices=i)

    return Dataset(spec, make(tr), make(va), make(te), num_classes, int(x.shape[1]), int(x.shape[-1]),
                   tuple(mean.tolist()), tuple(std.tolist()), classes)


# --------------------------------------------------------------------------- sources


def _digits(spec: DataSpec, device: torch.device) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _tensor_dataset(spec, x, y, device, 10, tuple(str(c) for c in range(10)))


def _synthetic(spec: DataSpec, device: torch.device) -> Dataset:
    """10 classes of smooth colour patterns, randomly shifted and scaled, plus a weaker pattern of a
    random class and strong pixel noise: learnable by a small CNN, not trivially (~75 % after 5 epochs)."""
    size = spec.image_size or 32
    g = torch.Generator().manual_seed(int(spec.seed))
    coarse = max(1, min(4, size))
    templates = torch.randn(SYNTHETIC_CLASSES, 3, coarse, coarse, generator=g)
    templates = F.interpolate(templates, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.arange(SYNTHETIC_SAMPLES) % SYNTHETIC_CLASSES
    y = y[torch.randperm(SYNTHETIC_SAMPLES, generator=g)]
    x = templates[y]
    max_shift = max(1, size // 8)
    shifts = torch.randint(-max_shift, max_shift + 1, (SYNTHETIC_SAMPLES, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])
    contrast = 0.5 + torch.rand(SYNTHETIC_SAMPLES, 1, 1, 1, generator=g)
    distractor = templates[torch.randint(0, SYNTHETIC_CLASSES, (SYNTHETIC_SAMPLES,), generator=g)]
    x = x * contrast + 0.6 * distractor + SYNTHETIC_NOISE * torch.randn(x.shape, generator=g)
    return _tensor_dataset(spec, x, y, device, SYNTHETIC_CLASSES)


def _npz(spec: DataSpec, path: str, device: torch.device) -> Dataset:
    path = os.path.expanduser(path)

    def bad(what: str) -> AutopruneError:
        return AutopruneError(f"npz data file {path!r}: {what}")

    if not os.path.isfile(path):
        raise bad("not found; give an existing .npz with arrays x (N,H,W or N,C,H,W) and y (N,)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for key in ("x", "y"):
                if key not in arrays.files:
                    raise bad(f"no array {key!r} (has: {', '.join(arrays.files) or 'none'}); "
                              "save images as x (N,H,W or N,C,H,W) and labels as y (N,)")
            x_np, y_np = arrays["x"], arrays["y"]
    except AutopruneError:
        raise
    except Exception as exc:  # zipfile/pickle/value errors from a corrupt file
        raise bad(unreadable(exc)) from exc
    if x_np.ndim == 4 and x_np.shape[1] not in (1, 3, 4) and x_np.shape[-1] in (1, 3, 4):
        x_np = np.transpose(x_np, (0, 3, 1, 2))  # channels-last N,H,W,C
    x_np = x_np[:, None] if x_np.ndim == 3 else x_np
    if np.iscomplexobj(x_np) or np.iscomplexobj(y_np):
        raise bad(f"x has dtype {x_np.dtype} and y {y_np.dtype}: complex numbers are no pixels or labels; save "
                  "real-valued images (e.g. np.abs(x) or x.real) and integer labels")
    if x_np.ndim != 4 or len(x_np) == 0 or not np.issubdtype(x_np.dtype, np.number):
        raise bad(f"x has shape {x_np.shape} and dtype {x_np.dtype}; expected numbers shaped N,H,W or N,C,H,W")
    if y_np.shape != (len(x_np),):
        raise bad(f"y has shape {y_np.shape}; expected ({len(x_np)},), one label per image")
    if not np.issubdtype(y_np.dtype, np.number) or np.any(np.mod(y_np, 1) != 0) or y_np.min() < 0:
        raise bad("y must hold non-negative integer class labels")
    present = np.unique(y_np).astype(np.int64)
    if len(present) >= 2 and len(present) < int(present[-1]) + 1 and int(present[-1]) < 10_000:
        missing = sorted(set(range(int(present[-1]) + 1)) - set(present.tolist()))
        raise bad(f"labels must be the class indices 0..K-1, but {len(missing)} of 0..{int(present[-1])} have no "
                  f"image ({', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); relabel y to "
                  f"0..{len(present) - 1}, e.g. y = np.unique(y, return_inverse=True)[1]")
    x = torch.from_numpy(np.ascontiguousarray(x_np)).float().div_(255.0 if x_np.dtype == np.uint8 else 1.0)
    y = torch.from_numpy(y_np.astype(np.int64))
    return _tensor_dataset(spec, x, y, device, int(y.max()) + 1)


def _imagefolder(spec: DataSpec, root: str, device: torch.device) -> Dataset:
    from torchvision import transforms

    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise AutopruneError(f"image folder {root!r} not found; give a directory with one sub-folder per class")
    size = spec.image_size or 224
    base = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    from .imagefolder import SafeImageFolder

    try:
        folder = SafeImageFolder(root, transform=base)  # symlinks followed once, broken files named
    except (FileNotFoundError, RuntimeError) as exc:
        raise AutopruneError(f"image folder {root!r}: {' '.join(str(exc).split())}") from exc
    y = np.asarray(folder.targets)
    tr, va, te = split_indices(y, spec.seed, spec.val_fraction, spec.test_fraction)
    rng = np.random.default_rng(spec.seed)  # train stats from up to 512 train images
    sample = rng.choice(tr, size=min(512, len(tr)), replace=False)
    mean, std = _channel_stats(torch.stack([folder[int(i)][0] for i in sample]))
    folder.transform = transforms.Compose([base, transforms.Normalize(mean.tolist(), std.tolist())])

    def make(idx: np.ndarray) -> LoaderSplit:
        return LoaderSplit(torch.utils.data.Subset(folder, idx.tolist()), device)

    return Dataset(spec, make(tr), make(va), make(te), len(folder.classes), 3, size,
                   tuple(mean.tolist()), tuple(std.tolist()), tuple(folder.classes))


def _torchvision_set(spec: DataSpec, device: torch.device) -> Dataset:
    root = os.path.expanduser(spec.root or DEFAULT_ROOT)
    if spec.name in idx.SETS:  # MNIST-style: look for the idx files offline first (autoprune.data.idx)
        files = idx.find_idx(spec.name, spec.root, DEFAULT_ROOT)
        if files is not None:
            x_np, y_np, xt_np, yt_np = idx.load_idx_set(files)
            logger.info("data %s: idx files from %s", spec.name, files["train_x"].parent)
            x, x_test = (torch.from_numpy(a).unsqueeze(1).contiguous() for a in (x_np, xt_np))
            return _uint8_dataset(spec, x, torch.from_numpy(y_np), x_test, torch.from_numpy(yt_np),
                                  len(idx.CLASSES[spec.name]), idx.CLASSES[spec.name], device)
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
           "mnist": datasets.MNIST, "fashionmnist": datasets.FashionMNIST}[spec.name]
    try:
        train_set, test_set = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as exc:  # URLError, RuntimeError, checksum errors, ...
        if spec.name in idx.SETS:
            raise AutopruneError(idx.missing_message(spec.name, spec.root, DEFAULT_ROOT, exc)) from exc
        raise AutopruneError(
            f"data set {spec.name!r} could not be downloaded into {root!r} ({type(exc).__name__}); "
            f"place it in {root!r} (torchvision layout) or use npz:<path> / imagefolder:<dir>"
        ) from exc

    def arrays(ds) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)  # CIFAR is N,H,W,C
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    x, y = arrays(train_set)
    x_test, y_test = arrays(test_set)
    return _uint8_dataset(spec, x, y, x_test, y_test, len(train_set.classes),
                          tuple(str(c) for c in train_set.classes), device)


def _uint8_dataset(spec: DataSpec, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int,
                   classes: tuple[str, ...], device: torch.device) -> Dataset:
    """uint8 NCHW train (split into train/val by the seed) and official test images as TensorSplits."""
    if spec.image_size is not None and spec.image_size != x.shape[-1]:
        x, x_test = (_resize(t, spec.image_size).round_().clamp_(0, 255).to(torch.uint8) for t in (x, x_test))
    tr, va, _ = split_indices(y.numpy(), spec.seed, spec.val_fraction, 0.0)
    mean, std = _channel_stats(x[torch.from_numpy(tr)].float().div_(255.0))
    mean_d, std_d = mean.to(device), std.to(device)

    def make(xs: Tensor, ys: Tensor, rows: np.ndarray | None) -> TensorSplit:
        i = None if rows is None else torch.from_numpy(rows)
        xs, ys = (xs, ys) if i is None else (xs[i], ys[i])
        return TensorSplit(xs.to(device), ys.to(device), mean_d, std_d, i)

    return Dataset(spec, make(x, y, tr), make(x, y, va), make(x_test, y_test, None), num_classes,
                   int(x.shape[1]), int(x.shape[-1]), tuple(mean.tolist()), tuple(std.tolist()), classes)


# --------------------------------------------------------------------------- entry points


def list_datasets() -> list[str]:
    """Known data set names; prefix forms are written with a placeholder."""
    return ["digits", "synthetic", "npz:<path>", "imagefolder:<dir>", *TORCHVISION_SETS]


def load_data(spec: DataSpec, device: str | torch.device = "cpu") -> Dataset:
    """Load ``spec``'s data, split it by the seed and put tensor splits on ``device``."""
    device = torch.device(device)
    name = spec.name
    if name == "digits":
        data = _digits(spec, device)
    elif name == "synthetic":
        data = _synthetic(spec, device)
    elif name.startswith("npz:"):
        data = _npz(spec, name[len("npz:"):], device)
    elif name.startswith("imagefolder:"):
        data = _imagefolder(spec, name[len("imagefolder:"):], device)
    elif name in TORCHVISION_SETS:
        data = _torchvision_set(spec, device)
    else:
        raise AutopruneError(f"unknown data set {name!r}: {did_you_mean(name, list_datasets())}")
    data = replace(data, split_hash=hash_splits(data.train, data.val, data.test))
    remember(spec, data.split_hash)
    logger.info("data %s: %d train / %d val / %d test, %d classes, %dx%dx%d, split %s", name, len(data.train),
                len(data.val), len(data.test), data.num_classes, data.in_channels, data.image_size, data.image_size,
                data.split_hash)
    return data
