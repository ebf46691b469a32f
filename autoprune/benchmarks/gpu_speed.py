"""Parts 1 and 2 of the GPU benchmark (:mod:`autoprune.benchmarks.gpu`): training and inference speed.

Training throughput goes through :func:`autoprune.train.fit` exactly as a search trial calls it
(SGD + Nesterov, cosine schedule, its loss checks), on a :class:`~autoprune.data.datasets.TensorSplit`
held on the device (what ``load_data`` gives a trial on CUDA). Each setting trains a fresh copy of
the model for one warm-up epoch plus the timed epochs; images/s is the split's size over the
median seconds of a timed epoch (fit's own per-epoch timing, which ends in a device sync).
Inference times ``batch`` forwards under ``torch.inference_mode`` with the device synchronised
before and after; the base and the pruned model alternate in rounds, and each cell is the
median over rounds.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..data.datasets import Dataset, DataSpec, TensorSplit
from ..search.results import one_line
from ..train import TrainConfig, fit

PRECISIONS = ("fp32", "bf16", "fp16")
LABELS = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16 + GradScaler"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def synthetic_split(n: int, shape: tuple[int, int, int], classes: int, device: torch.device,
                    seed: int) -> TensorSplit:
    """``n`` learnable images on ``device``: a fixed random template per class plus unit noise."""
    g = torch.Generator(device=device).manual_seed(1234)  # the same templates for every split
    templates = torch.randn(classes, *shape, generator=g, device=device)
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g, device=device)
    x = 0.5 * templates[y] + torch.randn(n, *shape, generator=g, device=device)
    return TensorSplit(x, y)


def synthetic_data(n_train: int, n_val: int, shape: tuple[int, int, int], device: torch.device,
                   classes: int = 10) -> Dataset:
    """A :class:`Dataset` of synthetic splits on ``device`` (what ``prune(data=...)`` and fit read)."""
    return Dataset(spec=DataSpec("synthetic"), train=synthetic_split(n_train, shape, classes, device, 1),
                   val=synthetic_split(n_val, shape, classes, device, 2),
                   test=synthetic_split(max(1, n_val // 4), shape, classes, device, 3),
                   num_classes=classes, in_channels=shape[0], image_size=shape[1])


def train_config(precision: str, channels_last: bool, batch: int, epochs: int, lr: float = 0.01) -> TrainConfig:
    """The trial's TrainConfig with the precision and memory format of one setting."""
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch, amp=precision != "fp32",
                       amp_dtype=precision if precision != "fp32" else "auto", channels_last=channels_last, seed=0)


def fresh(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of ``model`` in the memory format of a setting (fit converts only towards channels-last)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return copy.deepcopy(model).to(memory_format=fmt)


def images_per_s(model: nn.Module, split: TensorSplit, cfg: TrainConfig, device: torch.device) -> float:
    """Training images per second of ``fit`` (median over the epochs after the first)."""
    history = fit(model, split, None, cfg, device).history
    seconds = [h["seconds"] for h in history[1:]] or [h["seconds"] for h in history]
    return len(split) / statistics.median(seconds)


def settings(precisions: Sequence[str], batches: Sequence[int]) -> list[tuple[str, bool, int]]:
    return [(p, cl, b) for p in precisions for cl in (True, False) for b in batches]


def training_rows(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, precisions: Sequence[str],
                  batches: Sequence[int], steps: int, timed_epochs: int, device: torch.device,
                  time_left: Callable[[], float]) -> list[dict[str, Any]]:
    """Images/s of each model in ``models`` (base first) per setting; speed-ups against the base."""
    rows: list[dict[str, Any]] = []
    for precision, cl, batch in settings(precisions, batches):
        row: dict[str, Any] = {"precision": LABELS[precision], "channels-last": cl, "batch": batch}
        rows.append(row)
        if time_left() <= 0:
            row["note"] = "skipped: time budget"
            continue
        n = batch * steps
        split = TensorSplit(x[:n], y[:n])
        cfg = train_config(precision, cl, batch, 1 + timed_epochs)
        try:
            speeds = [images_per_s(fresh(m, cl), split, cfg, device) for m in models]
        except Exception as exc:  # noqa: BLE001 - one setting's failure is a row, not the end of the part
            row["note"] = f"FAILED: {one_line(exc, 200)}"
            continue
        row["base img/s"] = speeds[0]
        if len(speeds) > 1:
            row["pruned img/s"] = speeds[1]
            row["training speed-up"] = speeds[1] / speeds[0]
    return rows


def _forward_ms(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, reps: int) -> float:
    cuda = x.device.type == "cuda"
    amp = torch.autocast("cuda", dtype=dtype) if cuda and dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
        if cuda:
            torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) * 1000.0 / reps


def interleaved_ms(models: Sequence[nn.Module], x: torch.Tensor, dtype: torch.dtype | None, rounds: int,
                   round_s: float) -> list[float]:
    """Median ms per forward of each model, timed in alternating rounds of about ``round_s`` each."""
    reps = []
    for m in models:
        _forward_ms(m, x, dtype, 2)  # warm-up: kernels picked, caches filled
        one = _forward_ms(m, x, dtype, 1) / 1000.0
        reps.append(int(min(200, max(2, round_s / max(one, 1e-6)))))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, m in enumerate(models):
            times[i].append(_forward_ms(m, x, dtype, reps[i]))
    return [statistics.median(t) for t in times]


def inference_rows(models: Sequence[nn.Module], shape: tuple[int, int, int], precisions: Sequence[str],
                   batches: Sequence[int], rounds: int, round_s: float, device: torch.device,
                   time_left: Callable[[], float]) -> list[dict[str, Any]]:
    """Forward latency (ms per batch) of base and pruned per setting, and the pruned model's speed-up."""
    rows: list[dict[str, Any]] = []
    for precision, cl, batch in settings(precisions, batches):
        row: dict[str, Any] = {"precision": precision, "channels-last": cl, "batch": batch}
        rows.append(row)
        if time_left() <= 0:
            row["note"] = "skipped: time budget"
            continue
        fmt = torch.channels_last if cl else torch.contiguous_format
        placed = [fresh(m, cl).to(device).eval() for m in models]
        x = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
        try:
            ms = interleaved_ms(placed, x, DTYPES[precision], rounds, round_s)
        except Exception as exc:  # noqa: BLE001 - one setting's failure is a row
            row["note"] = f"FAILED: {one_line(exc, 200)}"
            continue
        row["base ms"] = ms[0]
        row["base img/s"] = batch * 1000.0 / ms[0]
        if len(ms) > 1:
            row["pruned ms"] = ms[1]
            row["inference speed-up"] = ms[0] / ms[1]
    return rows
