"""Parts 4 and 5 of the GPU benchmark (:mod:`autoprune.benchmarks.gpu`): several trials on one GPU, latency.

Part 4 runs the same short search (``max_trials`` trials of L1 at random MACs targets, 1 fine-tune
epoch each, early stopping off, random sampler: with a fixed seed every worker count runs the same
configurations) with 1, 2 and 4 Optuna workers (``spec.workers``: processes sharing the one GPU),
and with the Ray backend at ``1/workers`` GPU per trial when Ray is importable. Each search runs in
its own spawned process so that the GPU memory it holds is its own; meanwhile this process polls
``nvidia-smi`` for the memory of every process on the GPU (CUDA context included) and
``torch.cuda.mem_get_info`` for the device-wide use. Trials per minute are given over the whole
search (worker start-up, the report included) and over the span in which trials ran (first trial
start to last trial end, from the study's timestamps).

Part 5 builds the latency model (:mod:`autoprune.engine.latency`, measured without its cache) on the
device for each batch size, measures its error on random held-out width assignments, and compares
L1 pruning to 0.5 targeted at the MACs with the same targeted at the predicted latency, each pruned
model's latency measured there (the latency model's own runner: bf16 autocast, channels-last).
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import multiprocessing as mp
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..search.results import one_line

log = logging.getLogger(__name__)

POLL_S = 0.5


def write_npz(path: Path, n: int, shape: tuple[int, int, int], classes: int = 10, seed: int = 0) -> None:
    """Learnable synthetic images (a random template per class plus unit noise) as ``x``/``y`` arrays."""
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((classes, *shape), dtype=np.float32)
    y = np.arange(n) % classes  # every class present: the data set's class count is ``classes``
    x = 0.5 * templates[y] + rng.standard_normal((n, *shape), dtype=np.float32)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))


def prepare_base(work: Path, model: str, n: int, image: int, device: torch.device) -> dict[str, Any]:
    """The data file and an (untrained) base checkpoint every search of this part reads."""
    from ..data.datasets import DataSpec, load_data
    from ..engine.cost import count_macs, count_params
    from ..engine.plan import save_base
    from ..models.registry import ModelSpec, create_model

    npz = work / "synthetic.npz"
    write_npz(npz, n, (3, image, image))
    data = {"name": f"npz:{npz}", "seed": 0, "val_fraction": 0.2, "test_fraction": 0.1}
    dataset = load_data(DataSpec(**data), "cpu")
    spec = ModelSpec(model, dataset.num_classes, 3, image)
    torch.manual_seed(0)
    net = create_model(spec)
    shape = (3, image, image)
    save_base(work / "base.pt", net, spec, dataset, {"val_acc": 0.1, "macs": count_macs(net, shape),
                                                     "params": count_params(net)})
    return {"data": data, "base": str(work / "base.pt"), "model": model, "device": str(device)}


def search_spec(study: str, base: dict[str, Any], workers: int, trials: int, epochs: int, batch: int) -> dict:
    return {"study": study, "model": base["model"], "data": base["data"], "base": base["base"],
            "device": base["device"], "workers": workers, "seed": 0, "sampler": "random",
            "objectives": ["val_acc", "macs"], "budget": {"max_trials": trials}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": {"low": 0.3, "high": 0.7}, "allocation": "global",
                      "epochs": epochs, "lr": 0.01, "batch_size": batch}}


def _child(spec_path: str, out: str, backend: str, workers: int, queue: Any) -> None:
    """Run one search (in a spawned process); put ('ok', reason) or ('error', message) on ``queue``."""
    import signal

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s search: %(message)s")
    try:
        from ..search import stop
        from ..search.runner import run_search

        signal.signal(signal.SIGTERM, stop.interrupt)  # stop cleanly, its workers too
        from ..search.spec import load_spec

        options = None
        if backend == "ray":
            from ..search.ray_setup import RayOptions

            options = RayOptions(gpus_per_trial=1.0 / workers, max_concurrent=workers)
        result = run_search(load_spec(spec_path), out_dir=out, progress=False, backend=backend, ray_options=options)
        queue.put(("ok", result.stop_reason))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records it
        queue.put(("error", one_line(exc, 240)))


class MemoryPoll:
    """Peak GPU memory while a search runs: per process (nvidia-smi, MiB) and device-wide (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_pid: dict[int, float] = {}
        self.peak_sum = 0.0
        self.device_peak = 0.0
        self.smi = True
        self._stop = threading.Event()
        self.before = self._device_used()
        self.exclude = set(self._smi()) | {os.getpid()} if device.type == "cuda" else set()  # not the search's
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _device_used(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) / 2**20

    def _smi(self) -> dict[int, float]:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            self.smi = False
            return {}
        found = {}
        for line in out.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].replace(".", "").isdigit():
                found[int(parts[0])] = float(parts[1])
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.device.type == "cuda":
                self.device_peak = max(self.device_peak, self._device_used())
                if self.smi:
                    now = {p: m for p, m in self._smi().items() if p not in self.exclude}
                    for pid, mib in now.items():
                        self.per_pid[pid] = max(self.per_pid.get(pid, 0.0), mib)
                    self.peak_sum = max(self.peak_sum, sum(now.values()))
            self._stop.wait(POLL_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _trial_span(out: Path, study: str) -> float | None:
    """Seconds from the first trial's start to the last trial's end, from the Optuna study's timestamps."""
    try:
        import optuna

        trials = optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'study.db'}").trials
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
        return (max(ends) - min(starts)).total_seconds() if starts and ends else None
    except Exception:  # noqa: BLE001 - a Ray snapshot may lack timestamps: the column stays blank
        return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run_one(work: Path, base: dict[str, Any], backend: str, workers: int, trials: int, epochs: int, batch: int,
            device: torch.device, timeout_s: float) -> dict[str, Any]:
    """One search in a child process; its row (trials per minute, memory, states)."""
    import yaml

    study = f"{backend}_w{workers}"
    spec_path = work / f"{study}.yaml"
    spec_path.write_text(yaml.safe_dump(search_spec(study, base, workers, trials, epochs, batch)))
    out = work / study
    # spawn on CUDA (a forked CUDA context is unusable); fork on the CPU (the dry run): no second torch import
    ctx = mp.get_context("spawn" if device.type == "cuda" else "fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(spec_path), str(out), backend, workers, queue), daemon=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mem = MemoryPoll(device)
    start = time.perf_counter()
    proc.start()
    mem.start()
    try:
        proc.join(max(1.0, timeout_s))
        if proc.is_alive():
            proc.terminate()  # SIGTERM: the search marks its running trials interrupted and stops
            proc.join(30)
    finally:
        mem.stop()
        if proc.is_alive():  # interrupted here: do not leave the search (and its workers) running
            proc.terminate()
            proc.join(30)
    wall = time.perf_counter() - start
    try:
        status, note = queue.get(timeout=5)
    except Exception:  # noqa: BLE001 - queue.Empty: the child died without a word
        status, note = "error", f"exit code {proc.exitcode}"
    if wall >= timeout_s:
        note = "stopped by the time budget"
    else:
        note = f"FAILED: {note}" if status != "ok" else f"stopped: {note}"
    rows = _read_csv(out / "trials.csv")
    done = [r for r in rows if r.get("state") in ("complete", "early_stopped")]
    failed = [r for r in rows if r.get("state") == "failed"]
    if failed:  # a trial-level error (out of memory, say) is the finding: name it
        note = ("FAILED: " if not done else "") + f"{note}; {len(failed)} trial(s) failed: {failed[0].get('error')}"
    span = _trial_span(out, study) if backend == "optuna" else None
    busy = sum(float(r.get("duration_s") or 0) for r in done)
    per_pid = sorted(mem.per_pid.values(), reverse=True)
    row: dict[str, Any] = {
        "backend": backend, "workers": workers, "trials done": len(done),
        "failed": len(failed), "wall s": wall,
        "trials/min (wall)": 60.0 * len(done) / wall if wall > 0 else None,
        "trials/min (running)": 60.0 * len(done) / span if span else None,
        "mean trials at once": busy / span if span else None,
        "GPU MiB per worker": max(per_pid[:workers]) if per_pid else None,
        "GPU MiB all processes": mem.peak_sum or None,
        "device MiB used (delta)": (mem.device_peak - mem.before) if device.type == "cuda" else None,
        "note": note,
    }
    if device.type == "cuda" and not mem.smi:
        row["note"] += "; nvidia-smi unavailable: per-process memory not measured"
    return row


def search_rows(work: Path, model: str, images: int, image: int, trials: int, epochs: int, batch: int,
                workers: Sequence[int], ray: bool, device: torch.device,
                time_left: Callable[[], float]) -> list[dict[str, Any]]:
    """Rows for every worker count (and Ray, when asked and importable); speed-ups against 1 worker."""
    base = prepare_base(work, model, images, image, device)
    plan = [("optuna", w) for w in workers]
    if ray:
        plan.append(("ray", max(workers)))
    rows: list[dict[str, Any]] = []
    if ray and importlib.util.find_spec("ray") is None:
        plan.pop()
        rows.append({"backend": "ray", "workers": max(workers), "note": "not run: ray is not importable here"})
    for i, (backend, w) in enumerate(plan):
        if time_left() <= 5:
            rows.append({"backend": backend, "workers": w, "note": "skipped: time budget"})
            continue
        share = (1 / w) / sum(1 / v for _, v in plan[i:])  # one worker needs the longest
        rows.append(run_one(work, base, backend, w, trials, epochs, batch, device, time_left() * share))
    one = next((r for r in rows if r["backend"] == "optuna" and r["workers"] == 1), {})
    for r in rows:
        for key, out in (("trials/min (wall)", "speed-up (wall)"), ("trials/min (running)", "speed-up (running)")):
            if one.get(key) and r.get(key):
                r[out] = r[key] / one[key]
    return rows


def latency_rows(model: str, image: int, batches: Sequence[int], points: int, rounds: int, n_validate: int,
                 device: torch.device, time_left: Callable[[], float]) -> list[dict[str, Any]]:
    """Part 5: per batch size, the latency model built on ``device`` (no cache), its error on random held-out
    widths, and L1 to 0.5 targeted at MACs vs at latency with the latency each really has there."""
    if importlib.util.find_spec("autoprune.engine.latency") is None:
        return [{"batch": None, "note": "not available: autoprune.engine.latency is not in this checkout"}]
    from ..engine.graph import find_groups
    from ..models.registry import ModelSpec, create_model

    shape = (3, image, image)
    torch.manual_seed(0)
    base = create_model(ModelSpec(model, 10, 3, image)).eval()
    groups = find_groups(base, shape)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        rows.append(row)
        if time_left() <= 0:
            row["note"] = "skipped: time budget"
            continue
        try:
            _latency_row(row, base, groups, shape, batch, points, rounds, n_validate, device)
        except Exception as exc:  # noqa: BLE001 - one batch size's failure is a row, the others still run
            row["note"] = f"FAILED: {one_line(exc, 240)}"
    return rows


def _latency_row(row: dict[str, Any], base: Any, groups: Any, shape: tuple[int, int, int], batch: int, points: int,
                 rounds: int, n_validate: int, device: torch.device) -> None:
    from ..engine import pruning as engine
    from ..engine.allocate import AllocationConfig, width_bounds
    from ..engine.latency import build_latency_model, measure_models
    from ..engine.latency_table import LatencyConfig
    from ..engine.latency_validate import validate
    from ..errors import AutopruneError

    cfg = LatencyConfig(device=str(device), batch_size=batch, points=points, rounds=rounds, use_cache=False)
    start = time.perf_counter()
    lm = build_latency_model(base, groups, shape, cfg)
    row.update({"build s": time.perf_counter() - start, "base ms": lm.measured_base_ms, "base ms predicted": lm.base})
    v = validate(base, groups, lm, shape, cfg, n=n_validate)
    row.update({"median error": v.median_rel_err, "p90 error": v.p90_rel_err, "Spearman": v.spearman})
    floor = lm.fraction({g.name: width_bounds(g, AllocationConfig(mode="global"))[0] for g in groups if g.prunable})
    # launch-bound small batches: the latency floor can sit near 1; aim 0.1 above it, at most 0.95, and skip
    # the latency-targeted prune when not even 0.02 of headroom is left (the floor is then mostly fixed cost)
    target = min(0.95, max(0.5, round(floor + 0.1, 2)))
    row["latency target"] = target
    pruned = {}
    for label, objective, t in (("MACs", None, 0.5), ("latency", lm, target)):
        if label == "latency" and floor > target - 0.02:
            row["note"] = f"latency floor {floor:.2f} of the base: no latency-targeted prune"
            continue
        try:
            pruned[label] = engine.prune(base, "l1", t, input_shape=shape, groups=groups,
                                         allocation={"mode": "global"}, objective=objective, recalibrate_batches=0)
        except AutopruneError as exc:
            row["note"] = f"{label} target: {one_line(exc, 240)}"
    ms = dict(zip(["base", *pruned], measure_models([base, *(r.model for r in pruned.values())], shape, cfg,
                                                    "latency of pruned models")))
    if "MACs" in pruned:
        row["MACs 0.5: latency frac"] = ms["MACs"] / ms["base"]
    if "latency" in pruned:
        row.update({"latency-targeted: MACs frac": pruned["latency"].macs_fraction,
                    "predicted latency frac": lm.fraction(pruned["latency"].plan.widths()),
                    "measured latency frac": ms["latency"] / ms["base"]})
