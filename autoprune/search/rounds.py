"""The screening round: which method wins where, learnt before any fine-tuning (issue 25).

A search over several methods spends its first trials on whatever the sampler proposes, and a
sampler that has seen nothing picks methods at random: on a held-out data set the shipped search
lost to its own best single method. Before the first trial, the round measures every one-shot
method (those that do not train while pruning) at each target window with the zero-training
fidelity: the pruned model's validation accuracy right after surgery and BN recalibration, seconds
per candidate (Spearman 0.95-0.97 with the after-fine-tune accuracy on Fashion-MNIST). Then it
queues, in this order, the trials the sampler runs first:

1. at each window, lowest target first, the best one-shot method, with the default parameters the
   round measured, run to the end (user attr ``window_best``; :func:`runs_to_end`): its point is the
   best single method's at that target, and an early reading misjudged it (ResNet-20, Fashion-MNIST,
   1,000 fine-tune images, seed 2: LRF at 0.3 read 0.802 after epoch 1, was stopped against LRF at 0.2's
   finished 0.872, and re-run to the end finished at 0.890);
2. every training-time method (ResRep: no zero-training reading exists) at the lowest window, where
   pruning is hardest and training while pruning has the most to give;
3. at each window, any other one-shot method within the margin of the best (``screen.se_multiple``
   standard errors of a validation accuracy; at most ``MAX_WINNERS`` per window in all);
4. the sensitivity-seeded shapes (``screen.sensitivity``);
5. later, once: when a complete trial's validation reading has reached the base's, every one-shot
   method not queued at the lowest window, there, run to the end (:func:`hedge`; the fine-tune then
   gives back what pruning took, so the zero-training ranking no longer tells the methods apart).

A training-time method at the other windows is left to the sampler: on Fashion-MNIST (1,000
fine-tune images) each such trial cost about two one-shot trials and finished below the window's
one-shot winner. The order matters under ``budget.compute``: what the budget cuts is the tail (a queued
trial predicted not to fit is not started, :mod:`.admission`; the sampler proposes the next). Windows
go lowest target first, whatever order the spec lists them in: the lowest window's point bounds the
largest part of the front's hypervolume (reference (0, 1): a point (acc, m) covers acc x (1 - m)), so a
budget that cuts the tail cuts the least; its trial is the cheapest; and it is the hardest to bring
back to the base, so when it does, the later windows can skip the teacher and the hedge fires after
one cheap trial (VGG-16-BN, 10,000 fine-tune images: the first trial, distilling two epochs, cost
386 CPU s at 0.2 against 738 s at 0.5, the hedge fired after it; the front did not move). When ``space.distill``
is searched, every queued trial distils at the space's largest weight (Fashion-MNIST, 1,000
fine-tune images, 3 seeds: +0.0054 front hypervolume, beyond 2 SE; +0.7 / +0.9 points at 0.3 / 0.2
of the MACs, within noise; README, Performance).

The round's fidelities join the screening reference (later one-shot candidates within a window are
screened against them), its measured seconds count against ``budget.compute`` (study meta
``round_work_s``), and it runs once per study (study meta ``round``). Targets: the grid of a stepped
target range, the choices of a categorical one, else points ``screen.bucket`` apart. Optuna backend
only; not with the latency objective (its targets are latency fractions).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import progress
from ..files import FileWriteError
from ..methods import get_method, make_params
from ..train import TrainConfig, evaluate
from . import early_stop
from .results import one_line
from .space import Range

if TYPE_CHECKING:
    import optuna

    from .spec import SearchSpec
    from .store import TrialStore
    from .trial import Worker

log = logging.getLogger(__name__)

MAX_WINNERS = 2  # one-shot methods queued per window
MAX_WINDOWS = 12


def round_targets(spec: SearchSpec) -> list[float]:
    """The target windows of the round (see the module docstring)."""
    t = spec.space["target"]
    if isinstance(t, Range):
        step = t.step or spec.screen.bucket
        n = max(0, math.floor((t.high - t.low) / step + 1e-9))
        grid = [round(t.low + i * step, 10) for i in range(n + 1)]
        if len(grid) > MAX_WINDOWS:
            grid = [grid[round(i * (len(grid) - 1) / (MAX_WINDOWS - 1))] for i in range(MAX_WINDOWS)]
        return grid
    if isinstance(t, list):
        return [float(x) for x in t]
    return [float(t)]


def is_one_shot(method: str, epochs: int) -> bool:
    impl = get_method(method)
    return int(impl.training_epochs(make_params(impl, {}), max(1, epochs))) == 0


def _allocation(spec: SearchSpec) -> str:
    modes = spec.space["allocation"]
    modes = modes if isinstance(modes, list) else [modes]
    return next((m for m in ("global", "uniform") if m in modes), modes[0])


def _batch_size(spec: SearchSpec) -> int:
    """The trials' batch size (LRF's calibration batches follow it), or the first choice when searched."""
    b = spec.space.get("batch_size", 128)
    return int(b[0] if isinstance(b, list) else b.low if isinstance(b, Range) else b)


def _fixed(value: Any, default: Any) -> Any:
    """The value the round uses for a parameter: a fixed spec value, else the method's default."""
    return default if isinstance(value, (list, Range)) else value


def probe(worker: Worker, method: str, target: float, allocation: str,
          shape: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Prune ``worker``'s base model with ``method`` (default parameters, or the spec's fixed values) to
    ``target``, BN-recalibrate, and read the validation accuracy: the zero-training fidelity."""
    from ..engine import pruning as engine
    from .space import to_prune_args
    from .trial import work_clock

    spec = worker.spec
    clock = work_clock(worker.device)
    start = clock()
    flat = {"method": method, "target": target, "allocation": allocation, "epochs": 1, "lr": 0.01}
    if allocation == "searched":
        flat.update({f"shape_{i}": 0.0 for i in range(1, int(spec.space["buckets"]))})
        flat.update(shape or {})
    fields = {f.name: f for f in dataclasses.fields(get_method(method).Params)}
    knobs = {p: _fixed(v, fields[p].default) for p, v in spec.method_space.get(method, {}).items()
             if p in fields and not (isinstance(v, (list, Range)) and fields[p].default is dataclasses.MISSING)}
    _, _, alloc, _, _, _ = to_prune_args(flat, spec.allocation)
    pruned = engine.prune(worker.model, method, target, data=worker.data, allocation=alloc, spec=worker.model_spec,
                          device=worker.device, train_cfg=TrainConfig(epochs=0, batch_size=_batch_size(spec),
                                                                      seed=int(spec.seed)),
                          groups=worker.groups, **knobs)
    fidelity = float(evaluate(pruned.model, worker.data.val, worker.device)["acc"])
    macs_frac, params_frac = pruned.macs / pruned.base_macs, pruned.params / pruned.base_params
    return {"method": method, "target": target, "allocation": allocation, "fidelity": fidelity,
            "macs_frac": macs_frac, "params_frac": params_frac,
            "cost_frac": params_frac if spec.objectives[1] == "params" else macs_frac,
            "knobs": {k: v for k, v in knobs.items() if isinstance(v, (bool, int, float, str))},
            "work_s": clock() - start}


def sensitivity_shape(worker: Worker, method: str, target: float) -> dict[str, Any]:
    """A per-layer shape seeded from a sensitivity scan (ModelOpt FastNAS's idea), with the
    zero-training fidelity: at ``target``, the searched allocation with all multipliers equal, then
    with each depth bucket's keep multiplier halved (the allocator gives the MACs back to the others)
    and with the residual stream's halved. A part whose squeeze costs more accuracy than the mean
    gets a larger multiplier: log2 m = 0.5 log2(loss / mean loss) (loss floored at one image),
    relative to bucket 0 and clipped to the space's ranges. Returns the losses and the shape
    (``shape_1..``, ``shape_residual``) as flat trial parameters."""
    from .space import RESIDUAL

    spec = worker.spec
    k = int(spec.space["buckets"])
    n_val = len(worker.data.val)
    first = probe(worker, method, target, "searched")
    ref, work = first["fidelity"], first["work_s"]
    losses = []
    for b in range(k):  # squeezing bucket 0 = every other bucket x2 relative to it
        shape = {f"shape_{i}": (1.0 if b == 0 else (-1.0 if i == b else 0.0)) for i in range(1, k)}
        p = probe(worker, method, target, "searched", shape)
        work += p["work_s"]
        losses.append(max(1.0 / n_val, ref - p["fidelity"]))
    mean = sum(losses) / len(losses)
    log_m = [0.5 * math.log2(x / mean) for x in losses]
    lo, hi = _bounds(spec.space["log_ratio"])
    out: dict[str, Any] = {f"shape_{i}": min(hi, max(lo, log_m[i] - log_m[0])) for i in range(1, k)}
    residual = spec.space["residual"]
    res_loss = None
    if isinstance(residual, (list, Range)):
        p = probe(worker, method, target, "searched", {RESIDUAL: -1.0})
        work += p["work_s"]
        res_loss = max(1.0 / n_val, ref - p["fidelity"])
        rlo, rhi = _bounds(residual)
        out[RESIDUAL] = min(rhi, max(rlo, 0.5 * math.log2(res_loss / mean)))
    return {"method": method, "target": target, "reference": ref, "bucket_losses": losses,
            "residual_loss": res_loss, "shape": out, "work_s": work}


def _bounds(value: Any) -> tuple[float, float]:
    if isinstance(value, Range):
        return value.low, value.high
    if isinstance(value, list):
        return min(map(float, value)), max(map(float, value))
    return float(value), float(value)


def winners(points: Sequence[Mapping[str, Any]], n_val: int, se_multiple: float) -> list[Mapping[str, Any]]:
    """The round's points worth fine-tuning at one window: the best fidelity and those within the
    margin of it (at most :data:`MAX_WINNERS`), best first."""
    ok = sorted((p for p in points if math.isfinite(p["fidelity"])), key=lambda p: -p["fidelity"])
    if not ok:
        return []
    best = ok[0]["fidelity"]
    m = early_stop.margin_for(best, n_val, None, se_multiple) if se_multiple > 0 else 0.0
    return [p for p in ok if p["fidelity"] >= best - m][:MAX_WINNERS]


def run_round(worker: Worker, store: TrialStore, study: optuna.Study) -> list[dict[str, Any]]:
    """Run the round once per study (see the module docstring); returns its points ([] when it ran before)."""
    spec = worker.spec
    if store.meta().get("round") is not None:
        return []
    if spec.objectives[1] == "latency":  # targets are latency fractions there: the round probes MACs targets
        log.info("screening round skipped: the latency objective's targets are not MACs targets")
        store.set_meta("round", [])
        return []
    epochs = int(spec.space["epochs"]) if not isinstance(spec.space["epochs"], (list, Range)) else 3
    one_shot = [m for m in spec.methods if is_one_shot(m, epochs)]
    trained = [m for m in spec.methods if m not in one_shot]
    allocation = _allocation(spec)
    targets = sorted(round_targets(spec))  # lowest first: the queue's order (module docstring)
    points: list[dict[str, Any]] = []
    work = 0.0
    with progress.phase("screening round", total=len(targets) * len(one_shot), unit="candidate") as bar:
        for target in targets:
            for method in one_shot:
                try:
                    p = probe(worker, method, target, allocation)
                except FileWriteError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a method that cannot prune here is left out of the round
                    log.warning("screening round: %s at %.2f failed: %s", method, target, one_line(exc))
                    continue
                finally:
                    bar.advance()
                work += p["work_s"]
                points.append(p)
                log.info("screening round: %s at %.2f -> fidelity %.4f (%.3f of base MACs)", method, target,
                         p["fidelity"], p["macs_frac"])
    n_val = len(worker.data.val)
    ranked = [winners([p for p in points if p["target"] == t], n_val, spec.screen.se_multiple) for t in targets]
    first = [_params(spec, w[0]["method"], t, allocation, w[0]["knobs"]) for t, w in zip(targets, ranked) if w]
    second = [_params(spec, p["method"], t, allocation, p["knobs"]) for t, w in zip(targets, ranked) for p in w[1:]]
    seeded_q = _seeded(worker, store, points, targets, n_val)
    work += float((store.meta().get("sensitivity") or {}).get("work_s") or 0.0)
    low = min(targets)  # a training-time method is hedged where pruning is hardest (the lowest target) only
    trained_q = [_params(spec, m, low, allocation, {}) for m in trained]
    queue = first + trained_q + second + seeded_q
    for i, params in enumerate(queue):
        best = {"window_best": True} if i < len(first) else {}
        study.enqueue_trial(params, user_attrs={"round": True, **best}, skip_if_exists=True)
    store.set_meta("round", points)
    store.set_meta("round_work_s", work)
    log.info("screening round: %d candidates in %.1f s of work; %d trials queued", len(points), work, len(queue))
    return points


def runs_to_end(user_attrs: Mapping[str, Any]) -> bool:
    """Whether a trial with these user attrs runs to the end, neither screened nor early-stopped: a
    window's best one-shot method of the round, or a hedge (module docstring)."""
    return bool(user_attrs.get("window_best") or user_attrs.get("hedge"))


def hedge(worker: Worker, store: TrialStore, study: optuna.Study) -> list[dict[str, Any]]:
    """Once a finished trial's validation reading has reached the base's (the teacher's,
    :meth:`~.trial.Worker.teacher_acc`; any complete trial so far, as :mod:`.distillation` reads them), queue
    each one-shot method the round left out at its lowest window (round allocation and knobs, best
    fidelity first, the space's smallest ``distill``), once per study (study meta ``hedged``). These trials
    carry user attr ``hedge``: the worker runs them to the end, neither screened nor early-stopped.
    Returns the queued parameters ([] when nothing was queued).

    A trial that recovers the base's accuracy shows that the fine-tune gives back what pruning took, so
    the round's zero-training ranking no longer tells the methods apart. Measured on Fashion-MNIST
    VGG-16-BN with 10,000 fine-tune images: at 0.2 of the MACs L1's fidelity was 0.60 against LRF's 0.85,
    and after the same fine-tune without a teacher L1 finished at 0.8897, LRF at 0.8840 (README,
    Performance). Call it under the ask lock (one worker queues)."""
    spec = worker.spec
    if not (spec.screen.enabled and spec.screen.round):
        return []
    meta = store.meta()
    points = meta.get("round")
    if not points or meta.get("hedged") is not None:
        return []
    low = min(round_targets(spec))
    at_low = [p for p in points if float(p["target"]) == low]
    queued = {p["method"] for p in winners(at_low, len(worker.data.val), spec.screen.se_multiple)}
    rest = sorted((p for p in at_low if p["method"] not in queued and math.isfinite(p["fidelity"])),
                  key=lambda p: -p["fidelity"])
    best = max(((a, t.number) for t in store.trials() if t.state == "complete" and t.record.get("duplicate_of") is None
                for a in t.curve if a is not None), default=None)
    if not rest or best is None or best[0] < worker.teacher_acc():  # the base is evaluated only when needed
        return []
    out = [_params(spec, p["method"], low, p["allocation"], p["knobs"], distil=False) for p in rest]
    for params in out:
        study.enqueue_trial(params, user_attrs={"round": True, "hedge": True}, skip_if_exists=True)
    store.set_meta("hedged", {"after": best[1], "reading": best[0], "teacher": worker.teacher_acc(),
                              "methods": [p["method"] for p in rest], "target": low})
    log.info("trial %d reached the base's val_acc (%.4f >= %.4f): %s queued at %.2f", best[1], best[0],
             worker.teacher_acc(), ", ".join(p["method"] for p in rest) or "nothing", low)
    return out


def _seeded(worker: Worker, store: TrialStore, points: Sequence[Mapping[str, Any]], targets: Sequence[float],
            n_val: int) -> list[dict[str, Any]]:
    """With ``screen.sensitivity`` and a searched allocation: the sensitivity scan at the middle window
    with its winner, then one searched trial per window (its winner, the seeded shape)."""
    spec = worker.spec
    modes = spec.space["allocation"] if isinstance(spec.space["allocation"], list) else [spec.space["allocation"]]
    if not (spec.screen.sensitivity and "searched" in modes and points):
        return []
    middle = targets[len(targets) // 2]
    top = winners([p for p in points if p["target"] == middle], n_val, 0.0)
    if not top:
        return []
    try:
        seeded = sensitivity_shape(worker, top[0]["method"], middle)
    except Exception as exc:  # noqa: BLE001 - the round goes on without a seeded shape
        log.warning("sensitivity scan failed: %s", one_line(exc))
        return []
    store.set_meta("sensitivity", seeded)
    log.info("sensitivity scan (%s at %.2f): bucket losses %s, residual %s -> shape %s", top[0]["method"], middle,
             [round(x, 4) for x in seeded["bucket_losses"]], seeded["residual_loss"], seeded["shape"])
    out = []
    for target in targets:
        for p in winners([p for p in points if p["target"] == target], n_val, 0.0)[:1]:
            params = _params(spec, p["method"], target, "searched", p["knobs"])
            params.update({k: v for k, v in seeded["shape"].items() if _searched(spec, k)})
            out.append(params)
    return out


def _searched(spec: SearchSpec, key: str) -> bool:
    from .space import RESIDUAL

    value = spec.space["residual"] if key == RESIDUAL else spec.space["log_ratio"]
    return isinstance(value, (list, Range))


def _params(spec: SearchSpec, method: str, target: float, allocation: str, knobs: Mapping[str, Any],
            distil: bool = True) -> dict:
    """The searched parameters of a queued trial (fixed ones are not Optuna parameters); a searched
    ``distill`` at the space's largest weight, or its smallest when not ``distil``."""
    out: dict[str, Any] = {}
    distill = spec.space.get("distill", 0.0)
    if isinstance(distill, list):  # searched: the round's trials distil at the space's largest weight
        out["distill"] = max(distill) if distil else min(distill)
    elif isinstance(distill, Range):
        out["distill"] = distill.high if distil else distill.low
    if isinstance(spec.space["method"], list):
        out["method"] = method
    if isinstance(spec.space["target"], (list, Range)):
        out["target"] = target
    if isinstance(spec.space["allocation"], list):
        out["allocation"] = allocation
    for p, v in knobs.items():
        space_value = spec.method_space.get(method, {}).get(p)
        if (isinstance(space_value, list) and v in space_value) or (
                isinstance(space_value, Range) and space_value.low <= v <= space_value.high):
            out[f"{method}.{p}"] = v
    return out
