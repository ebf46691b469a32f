"""Part 3 of the GPU benchmark (:mod:`autoprune.benchmarks.gpu`): every method on the device.

For each method and mixed precision: ``prune`` (the engine's front door, as a trial calls it, with
the data on the device and the trial's TrainConfig) and a 1-epoch fine-tune with ``fit``. Checked:
both complete, the fine-tune loss is finite, LRF's feature covariances and FSM's clipped-Gaussian
moments are computed on the device (spies on :func:`autoprune.methods.lrf_features.feature_stats`
and :func:`autoprune.methods.moments.clipped_normal_moments` record where their tensors live),
and ResRep's fold reproduces the compactor model on the device (:func:`fold_error`).

Silent CPU round trips are measured with ``torch.profiler``: device-to-host copies (``Memcpy DtoH``
device events), host synchronisations (``cudaStreamSynchronize``/``cudaDeviceSynchronize``/
``cudaEventSynchronize``/``cudaMemcpy`` runtime calls) and the share of wall time the host spent
blocked in them; per optimizer step for the fine-tune. The profiler's own overhead inflates wall
times a little, so the shares are upper bounds.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.datasets import Dataset
from ..engine import pruning as engine
from ..engine.graph import ChannelGroup
from ..train import TrainConfig, fit, steps_per_epoch

log = logging.getLogger(__name__)

METHODS = ("l1", "lrf", "fsm", "resrep")
TARGET = 0.5
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})


@dataclass
class Traffic:
    """What a profiled block did: wall seconds, DtoH copies, host syncs and their seconds, kernel seconds.

    ``syncs`` is None where the profiler recorded no CUDA runtime calls (then it could not see them)."""

    wall_s: float = 0.0
    dtoh: int = 0
    dtoh_s: float = 0.0
    syncs: int | None = 0
    sync_s: float = 0.0
    kernel_s: float = 0.0

    @property
    def blocked_share(self) -> float:
        """Share of the wall time the host spent in syncs (a DtoH copy to pageable memory is one too)."""
        return self.sync_s / self.wall_s if self.wall_s > 0 and self.syncs is not None else math.nan

    @property
    def busy_share(self) -> float:
        """Share of the wall time the device ran kernels (nan on a CPU)."""
        return self.kernel_s / self.wall_s if self.wall_s > 0 and self.kernel_s > 0 else math.nan


def _seconds(event: Any) -> float:
    if hasattr(event, "duration_ns"):
        return event.duration_ns() / 1e9
    return event.duration_us() / 1e6  # older torch


@contextlib.contextmanager
def traffic(device: torch.device) -> Iterator[Traffic]:
    """Profile the block; the yielded :class:`Traffic` is filled in when it ends.

    On CUDA only device activity is recorded (kernels, copies and the CUDA runtime calls, no CPU
    operators: less overhead on the timed block), and the raw Kineto events are read directly
    (building torch's event tree costs seconds per thousand steps). On a CPU the block's operators
    are recorded, so the dry run goes through the same code."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    out = Traffic()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        yield out
        if cuda:
            torch.cuda.synchronize(device)
        out.wall_s = time.perf_counter() - start
    launches = 0
    own_sync = None  # the measuring block's own closing cudaDeviceSynchronize: not the method's
    if cuda:
        own_sync = max((e for e in prof.profiler.kineto_results.events() if e.name() == "cudaDeviceSynchronize"),
                       key=lambda e: e.start_ns(), default=None)
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if own_sync is not None and name == "cudaDeviceSynchronize" and e.start_ns() == own_sync.start_ns():
            continue
        if "Memcpy DtoH" in name:
            out.dtoh += 1
            out.dtoh_s += _seconds(e)
        elif name in SYNC_CALLS:
            out.syncs = (out.syncs or 0) + 1
            out.sync_s += _seconds(e)
        elif "LaunchKernel" in name:
            launches += 1
        elif cuda and str(e.device_type()).endswith("CUDA") and not name.startswith(("Memcpy", "Memset")):
            out.kernel_s += _seconds(e)
    if cuda and launches == 0:
        out.syncs = None


@contextlib.contextmanager
def device_spies(found: dict[str, set[str]]) -> Iterator[None]:
    """Record the device types of LRF's feature covariances and of FSM's moment computations."""
    from ..methods import lrf, moments

    real_stats, real_moments = lrf.feature_stats, moments.clipped_normal_moments

    def stats_spy(*args: Any, **kwargs: Any) -> Any:
        out = real_stats(*args, **kwargs)
        found.setdefault("LRF feature covariances", set()).update(
            c.device.type for s in out.values() for c in s.cov.values())
        return out

    def moments_spy(mean: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        found.setdefault("FSM moments", set()).add(mean.device.type)
        return real_moments(mean, *args, **kwargs)

    lrf.feature_stats, moments.clipped_normal_moments = stats_spy, moments_spy
    try:
        yield
    finally:
        lrf.feature_stats, moments.clipped_normal_moments = real_stats, real_moments


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def fold_error(base: nn.Module, groups: list[ChannelGroup], data: Dataset, cfg: TrainConfig,
               device: torch.device, shape: tuple[int, int, int]) -> tuple[float, float]:
    """ResRep's fold on the device: relative output error of the folded vs the compactor model (eval mode)
    in fp32 (TF32 off for the check) and in fp64, after the compactors (moved off the identity) trained
    one epoch with the model in ``cfg``'s precision."""
    from ..methods.compactor import Compactors, find_sites

    model = copy.deepcopy(base).to(device)
    sites, _ = find_sites(model, groups, shape)
    comp = Compactors(model, sites)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for layer in comp.layers.values():
            w = layer.weight
            w.add_(0.3 * torch.randn(w.shape, generator=g, device=device) / math.sqrt(w.shape[1]))
    fit(model, data.train, None, cfg, device)
    x = next(iter(data.val.batches(64)))[0].to(device)
    model.eval().to(memory_format=torch.contiguous_format)  # fp64 convolutions in the plain layout
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 products
    try:
        with torch.no_grad():
            ref32 = model(x)
            model.double()
            ref64 = model(x.double())
            comp.fold()
            out64 = model(x.double())
            model.float()
            out32 = model(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return _rel(out32, ref32), _rel(out64, ref64)


def method_row(method: str, precision: str, base: nn.Module, groups: list[ChannelGroup], data: Dataset,
               batch: int, device: torch.device) -> dict[str, Any]:
    """Prune + 1-epoch fine-tune of one method in one precision; the checks and the traffic per step."""
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=batch, amp_dtype=precision, seed=0)
    found: dict[str, set[str]] = {}
    row: dict[str, Any] = {"method": method, "precision": precision}
    with device_spies(found), traffic(device) as pruning:
        result = engine.prune(base, method, TARGET, data=data, device=device, train_cfg=cfg, groups=groups)
    row.update({"MACs kept": result.macs_fraction, "prune s": pruning.wall_s, "prune DtoH": pruning.dtoh,
                "prune syncs": pruning.syncs, "prune blocked": pruning.blocked_share})
    steps = steps_per_epoch(len(data.train), batch)
    with traffic(device) as tuning:
        fitted = fit(result.model, data.train, data.val, cfg, device)
    loss = float(fitted.history[-1]["train_loss"])
    row.update({"fine-tune loss": loss, "finite": math.isfinite(loss), "val acc": fitted.final_val_acc,
                "DtoH/step": tuning.dtoh / steps,
                "syncs/step": None if tuning.syncs is None else tuning.syncs / steps,
                "blocked": tuning.blocked_share, "GPU busy": tuning.busy_share})
    where = [f"{k}: {'+'.join(sorted(v))}" for k, v in sorted(found.items())]
    expected = {"lrf": "LRF feature covariances", "fsm": "FSM moments"}.get(method)
    ok = expected is None or found.get(expected) == {device.type}
    if method == "resrep":
        e32, e64 = fold_error(base, groups, data, cfg, device, (data.in_channels, data.image_size, data.image_size))
        where.append(f"fold rel. error fp32 {e32:.1e}, fp64 {e64:.1e}")
        ok = e64 < 1e-9 and e32 < 1e-4
    row["on device"] = "; ".join(where) or "(no device-side statistics)"
    row["checks"] = "pass" if ok and row["finite"] else "FAIL"
    return row


def method_rows(base: nn.Module, data: Dataset, precisions: Sequence[str], batch: int, device: torch.device,
                time_left: Any) -> list[dict[str, Any]]:
    """One row per (precision, method); a failing method is a row with its error, the rest still run."""
    from ..engine.graph import find_groups
    from ..search.results import one_line

    shape = (data.in_channels, data.image_size, data.image_size)
    groups = find_groups(base, shape)
    rows = []
    for precision in precisions:
        for method in METHODS:
            if time_left() <= 0:
                rows.append({"method": method, "precision": precision, "checks": "skipped: time budget"})
                continue
            try:
                rows.append(method_row(method, precision, base, groups, data, batch, device))
            except Exception as exc:
                log.warning("%s in %s failed", method, precision, exc_info=True)
                rows.append({"method": method, "precision": precision, "checks": f"FAIL: {one_line(exc, 200)}"})
    return rows
