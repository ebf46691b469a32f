"""Latency as the search's second objective: the spec's ``latency`` section, the worker's latency model,
and measuring a trial's latency with the search's other workers paused.

With ``objectives: [val_acc, latency]`` the sampled ``target`` is a fraction of the base's latency on
this device (the worker's :class:`~autoprune.engine.latency.LatencyModel`, measured once and cached),
every method's allocation aims at it, and each trial records its measured latency: the pruned model
is timed interleaved with the base (so drift of a shared machine cancels in the ratio), and
``latency_ms`` is that measured fraction times the base's latency measured when the worker started.

Pausing: a worker that measures takes ``.measure.lock`` in the results folder; every other worker
checks it at each optimizer step and epoch end of its fine-tuning and waits while it is held; the
measurer waits ``SETTLE_S`` for them to reach that point first. Training inside ResRep's own epochs
and evaluation do not check it (a measurement may overlap at most one such step).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.latency_table import RUNTIMES, LatencyConfig
from ..errors import AutopruneError
from .locks import file_lock

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-process searches only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MEASURE_LOCK = ".measure.lock"
BUILD_LOCK = ".latency.lock"
SETTLE_S = 1.0
DEFAULTS = {"batch_size": 1, "runtime": "torch", "threads": None, "rounds": 5, "points": 5, "clock": "wall",
            "feedback": 0}


def parse_latency(chk: Any, value: Any) -> dict[str, Any]:
    """The spec's ``latency: {batch_size [1], runtime [torch], threads [null: the search's], rounds [5],
    points [5], clock [wall], feedback [0]}`` section (rounds: interleaved timing rounds; points: table grid
    points per width; clock cpu: the measuring thread's CPU time, for one thread on a machine shared with other
    work; feedback: timed allocations per trial that close its target on measurement, see
    :mod:`autoprune.engine.latency_feedback`; 0 by default because a trial is timed after pruning anyway and
    the front is on measured latency)."""
    value = value or {}
    if not isinstance(value, dict):
        raise chk.err("latency", f"must be a mapping {{batch_size, runtime, threads}}, got {value!r}")
    chk.keys(value, "latency", list(DEFAULTS), what="key")
    runtime = chk.string(value.get("runtime", "torch"), "latency.runtime")
    if runtime not in RUNTIMES:
        raise chk.err("latency.runtime", f"unknown latency runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    threads = value.get("threads")
    out = {"batch_size": chk.integer(value.get("batch_size", 1), "latency.batch_size", 1), "runtime": runtime,
           "threads": None if threads is None else chk.integer(threads, "latency.threads", 1),
           "rounds": chk.integer(value.get("rounds", 5), "latency.rounds", 1),
           "points": chk.integer(value.get("points", 5), "latency.points", 2),
           "clock": chk.string(value.get("clock", "wall"), "latency.clock"),
           "feedback": chk.integer(value.get("feedback", 0), "latency.feedback", 0)}
    try:
        LatencyConfig(runtime=runtime, batch_size=out["batch_size"], threads=out["threads"] or 1, clock=out["clock"])
    except AutopruneError as exc:
        raise chk.err("latency", str(exc)) from None
    return out


def config(spec: Any, device: torch.device) -> LatencyConfig:
    """The LatencyConfig of a worker: the spec's section; threads default to the worker's torch threads."""
    s = {**DEFAULTS, **dict(getattr(spec, "latency", None) or {})}
    runtime_device = "cpu" if s["runtime"] == "onnxruntime" else str(device)
    return LatencyConfig(runtime=s["runtime"], device=runtime_device, batch_size=int(s["batch_size"]),
                         threads=s["threads"], rounds=int(s["rounds"]), points=int(s["points"]), clock=str(s["clock"]))


def setting(cfg: LatencyConfig, device_name: str = "") -> str:
    """``batch 1, torch, 2 thread(s)`` (+ the device name): what report tables and plots say."""
    text = f"batch {cfg.batch_size}, {cfg.runtime}, {cfg.n_threads} thread(s)" + (", CPU-time clock" if cfg.clock == "cpu"
                                                                                   else "")
    return f"{text}, {device_name}" if device_name else text


def build_for_worker(out_dir: Path, model: nn.Module, groups: Sequence[Any], shape: Sequence[int],
                     cfg: LatencyConfig, others: bool = False) -> Any:
    """The latency model (from the cache, or measured by one worker at a time with the others waiting)."""
    from ..engine.latency import build_latency_model

    with file_lock(Path(out_dir) / BUILD_LOCK), measuring(out_dir, others):
        return build_latency_model(model, groups, shape, cfg)


@contextlib.contextmanager
def measuring(out_dir: str | Path, others: bool = False) -> Iterator[None]:
    """Hold the measure lock (the other workers pause at their next step); with ``others`` (a search with
    more than one worker) wait ``SETTLE_S`` for them to get there first."""
    with file_lock(Path(out_dir) / MEASURE_LOCK):
        if others:
            time.sleep(SETTLE_S)
        yield


class PausePoint:
    """Called at each optimizer step / epoch end of a worker's training: waits while another worker
    measures (holds the measure lock). One open file per worker; a non-blocking check costs microseconds."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / MEASURE_LOCK
        self._fh: Any = None

    def __call__(self, *_args: Any) -> None:
        if fcntl is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+")  # noqa: SIM115 - kept open for the worker's lifetime
        try:
            fcntl.flock(self._fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            start = time.perf_counter()
            fcntl.flock(self._fh, fcntl.LOCK_SH)  # blocks until the measurement ends
            log.debug("paused %.2f s while another worker measured latency (pid %d)", time.perf_counter() - start,
                      os.getpid())
        fcntl.flock(self._fh, fcntl.LOCK_UN)


def warn_unreachable(spec: Any, groups: Sequence[Any], lm: Any) -> None:
    """Warn once per worker when the sampled targets reach below the fastest reachable latency fraction
    (those trials fail with one line naming it; at batch 1 framework overhead sets a floor)."""
    from ..engine.allocate import AllocationConfig, floor_widths

    cfg = AllocationConfig(**{k: v for k, v in dict(spec.allocation).items()})
    floor = lm.value(floor_widths(groups, cfg, lm)) / lm.base  # with round_to (auto: the model's multiples)
    target = spec.space.get("target")
    low = getattr(target, "low", None)
    if low is None and isinstance(target, list):
        low = min(target)
    elif low is None and isinstance(target, (int, float)):
        low = target
    if low is not None and float(low) < floor:
        log.warning("%s: space.target goes down to %.3f but the fastest reachable latency fraction on this device "
                    "is %.3f (%s) as the latency model predicts it; trials below it fail unless latency.feedback times "
                    "the narrowest widths below the target: raise space.target's low end", spec.source, float(low), floor,
                    setting(config_of(lm)))


def config_of(lm: Any) -> LatencyConfig:
    i = lm.info
    return LatencyConfig(runtime=str(i.get("runtime", "torch")), batch_size=int(i.get("batch_size", 1)),
                         threads=int(i.get("threads", 1)))


def feedback(spec: Any, worker: Any) -> Any:
    """The trial's :class:`~autoprune.engine.latency_feedback.LatencyFeedback` (None when ``latency.feedback``
    is 0): its timings hold the measure lock like the trial's own."""
    from ..engine.latency_feedback import LatencyFeedback

    rounds = int(dict(getattr(spec, "latency", None) or {}).get("feedback", 0))
    if not rounds:
        return None
    return LatencyFeedback.timing(worker.model, worker.groups, worker.input_shape, worker.latency_cfg, rounds,
                                  guard=lambda: measuring(worker.out_dir, spec.workers > 1))


def measure_trial(out_dir: str | Path, base: nn.Module, pruned: nn.Module, shape: Sequence[int],
                  cfg: LatencyConfig, others: bool = False) -> tuple[float, float]:
    """(pruned ms, base ms) timed interleaved, with the other workers paused."""
    from ..engine.latency import measure_models

    with measuring(out_dir, others):
        base_ms, pruned_ms = measure_models([base, pruned], shape, cfg, "trial latency")
    return pruned_ms, base_ms


def record(cfg: LatencyConfig, predicted_ms: float | None = None) -> dict[str, Any]:
    """What a search's base metrics say about how latency was measured (report tables and plots show it)."""
    from ..engine.latency_table import device_name

    name = device_name(cfg.device)
    out: dict[str, Any] = {"latency_setting": setting(cfg, name), "latency_batch_size": cfg.batch_size,
                           "latency_runtime": cfg.runtime, "latency_threads": cfg.n_threads, "latency_device": name}
    if predicted_ms is not None:
        out["latency_predicted_ms"] = predicted_ms
    return out
