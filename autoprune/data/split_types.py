"""The two kinds of split a :class:`~autoprune.data.datasets.Dataset` holds, and subsets of them.

:class:`TensorSplit`: tensors in memory (on the GPU when the data set was loaded for CUDA), batched by
slicing, augmented on the device. :class:`LoaderSplit`: a DataLoader over files (ImageFolder sets).
Both yield ``(x float NCHW, y long)`` batches on their device.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import AutopruneError
from .augment import augment_batch

__all__ = ["LoaderSplit", "Split", "TensorSplit", "subset_split"]


class Split(ABC):
    """One of train/val/test: yields ``(x float NCHW, y long)`` batches on the split's device."""

    device: torch.device

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                augment: bool | Sequence[str] = False) -> Iterator[tuple[Tensor, Tensor]]: ...

    @abstractmethod
    def to(self, device: str | torch.device) -> Split: ...


class TensorSplit(Split):
    """A split held as tensors. ``x`` is float (already standardised) or uint8 with ``mean``/``std``.

    uint8 storage (torchvision sets) is scaled to [0, 1] and standardised per batch, which keeps
    CIFAR in 150 MB instead of 600 MB. ``indices`` are the rows of the source data (for audits).
    """

    def __init__(self, x: Tensor, y: Tensor, mean: Tensor | None = None, std: Tensor | None = None,
                 indices: Tensor | None = None) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x, self.y = x, y.long()
        self.mean, self.std, self.indices = mean, std, indices
        self.device = x.device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        else:
            x = x.float()
        if self.mean is not None and self.std is not None:
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as one standardised ``(x, y)`` pair."""
        return self._prepare(self.x), self.y

    def batches(self, batch_size, shuffle=False, generator=None, augment=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        gdev = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=gdev).to(self.device) if shuffle else None
        for start in range(0, n, batch_size):
            sel = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            xb = self._prepare(self.x[sel])
            yield (augment_batch(xb, generator, augment) if augment else xb), self.y[sel]

    def to(self, device):
        mean, std = (None if t is None else t.to(device) for t in (self.mean, self.std))
        return TensorSplit(self.x.to(device), self.y.to(device), mean, std, self.indices)


class LoaderSplit(Split):
    """A split over a torch Dataset (files on disk), read by a DataLoader; batches go to ``device``."""

    def __init__(self, dataset: torch.utils.data.Dataset, device: str | torch.device = "cpu",
                 num_workers: int = 2) -> None:
        self.dataset = dataset
        self.device = torch.device(device)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, batch_size, shuffle=False, generator=None, augment=False):
        if generator is not None and generator.device.type != "cpu":
            generator = torch.Generator().manual_seed(int(generator.initial_seed()))
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle,
                                             generator=generator, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        while True:
            try:
                xb, yb = next(batches)
            except StopIteration:
                return
            except AutopruneError as exc:  # from a worker: torch put its traceback in the message
                from .imagefolder import worker_error

                raise worker_error(exc) from None
            xb = xb.to(self.device, non_blocking=True)
            yield (augment_batch(xb, generator, augment) if augment else xb), yb.to(self.device).long()

    def to(self, device):
        return LoaderSplit(self.dataset, device, self.num_workers)


def subset_split(split: Split, n: int | None, seed: int = 0) -> Split:
    """A fixed random ``n`` rows of ``split`` (drawn with ``seed``, kept in their original order); the
    split itself when ``n`` is None or not smaller. Tensor splits stay tensors; file-backed splits
    read only those files. Used for trials that train on part of the training split."""
    if n is None or n >= len(split):
        return split
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(int(seed)))[: int(n)].sort().values
    if isinstance(split, TensorSplit):
        index = rows.to(split.x.device)
        indices = None if split.indices is None else split.indices[rows.to(split.indices.device)]
        return TensorSplit(split.x[index], split.y[index], split.mean, split.std, indices)
    if isinstance(split, LoaderSplit):
        return LoaderSplit(torch.utils.data.Subset(split.dataset, rows.tolist()), split.device, split.num_workers)
    raise AutopruneError(f"cannot take a subset of a {type(split).__name__}")
