"""Budget admission: a trial that the compute budget left cannot pay for is not started (issue 25).

``budget.compute`` counts measured seconds of trial work (``work_s``: CPU time, or synchronised GPU
time). A trial used to start whenever any of it was left, so a search could overrun it by a whole
trial, and a benchmark at equal compute drops that trial: on Fashion-MNIST VGG-16-BN with 10,000
fine-tune images the search started a ResRep trial of 1,245 CPU s with 745 s left (README,
Performance). Now, before a trial runs, its work is predicted from the search's own finished
trials; when the prediction exceeds what is left, the trial does not run: it is recorded
early-stopped with ``stopped_at = "budget"`` (Optuna: PRUNED, which TPE counts among the worse
trials, so it learns what the budget cannot pay for), its work is 0, it does not count against
``max_trials`` and it is never reused as a result (a resumed search with more budget runs the
configuration when it is proposed again; a screening-round trial that was skipped is not queued
again). The search ends with reason ``compute`` when even the cheapest configuration the space
allows is predicted not to fit, or after :data:`MAX_SKIPS` such proposals in a row. With several
workers, trials running in other workers are not reserved: the budget can be overrun by what they
still spend, as before. Optuna backend only (the Ray backend starts a trial while any budget is left).

The prediction (a cost model, not a measurement): ``work = a + b * x``, where ``x`` counts a
trial's epochs weighted by the width trained: an epoch of training while pruning (ResRep's
compactor epochs train the full-width model) counts 1, a fine-tune epoch counts the target (the
pruned model's fraction of the base), and a distilled epoch adds :data:`TEACHER_SHARE` (the
teacher's forward pass). ``a`` (>= 0: surgery, recalibration, evaluations) and ``b`` are least
squares over the complete trials that ran every epoch (one such trial, or a fit with a negative
intercept: ``a = 0``; none: no prediction and the trial starts). Where the method has complete
trials of its own, the fit is scaled by the median ratio of their measured to fitted work (a ResRep
epoch costs more than a plain one: compactors and masks). A new trial that would distil is
predicted to distil the share of its fine-tune epochs that the finished trials with a distillation
weight did (the teacher is dropped once a student reaches it, :mod:`.distillation`; all of them
before any such trial finished).
"""
from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..methods import get_method, make_params
from .results import NOT_STARTED, TrialResult
from .space import Range, to_prune_args
from .store import work_used

if TYPE_CHECKING:
    from .spec import SearchSpec
    from .store import StoredTrial, TrialStore

log = logging.getLogger(__name__)

TEACHER_SHARE = 1.0 / 3.0  # a teacher's forward pass, in full-width training epochs (forward ~ 1/3 of a step)
MAX_SKIPS = 20  # configurations in a row that did not fit, before a worker stops


@dataclass(frozen=True)
class WorkModel:
    """``work_s = intercept + slope * x`` (x: :func:`width_epochs`), with per-method scale factors."""

    intercept: float
    slope: float
    scale: Mapping[str, float]

    def predict(self, method: str, x: float) -> float:
        """Predicted measured seconds of a trial of ``method`` with width-weighted epochs ``x``."""
        return self.scale.get(method, 1.0) * (self.intercept + self.slope * x)


def _epochs(spec: SearchSpec, hparams: Mapping[str, Any]) -> tuple[str, float, int, int]:
    """(method, target, epochs, k): a trial's epochs and the k of them it trains while pruning."""
    method, target, _, method_params, epochs, _ = to_prune_args(hparams, spec.allocation)
    impl = get_method(method)
    k = int(impl.training_epochs(make_params(impl, method_params), epochs))
    return method, float(target), epochs, min(epochs, max(0, k))


def width_epochs(spec: SearchSpec, hparams: Mapping[str, Any], distilled: float | None = None,
                 share: float = 1.0) -> tuple[str, float]:
    """(method, x): a trial's epochs weighted by the width trained (module docstring). ``distilled``:
    the epochs that ran with the teacher (a finished trial's ``distill_epochs``); None: ``share`` of the
    fine-tune epochs when the trial's ``distill`` weight is above 0."""
    method, target, epochs, k = _epochs(spec, hparams)
    if distilled is None:
        distilled = share * (epochs - k) if float(hparams.get("distill") or 0.0) > 0 else 0
    return method, k + (epochs - k) * target + TEACHER_SHARE * distilled


def distill_share(spec: SearchSpec, trials: Sequence[StoredTrial]) -> float:
    """The share of their fine-tune epochs that complete trials with a distillation weight distilled (1
    before any finished; reused results not counted again): what a new trial that would distil is predicted to."""
    done, total = 0, 0
    for t in trials:
        rec = t.record
        if float(t.hparams.get("distill") or 0.0) <= 0 or rec.get("distill_epochs") is None or t.interrupted \
                or t.state != "complete" or rec.get("duplicate_of") is not None:  # a reuse would count twice
            continue
        try:
            _, _, epochs, k = _epochs(spec, t.hparams)
        except Exception as exc:  # noqa: BLE001 - a trial of another space version: not evidence
            log.debug("work model: trial %d left out: %s", t.number, exc)
            continue
        done, total = done + int(rec["distill_epochs"]), total + max(0, epochs - k)
    return done / total if total else 1.0


def predict(spec: SearchSpec, model: WorkModel, trials: Sequence[StoredTrial], hparams: Mapping[str, Any]) -> float:
    """Predicted measured seconds of a new trial with ``hparams`` (module docstring)."""
    distils = float(hparams.get("distill") or 0.0) > 0  # only then read the finished trials' share
    return model.predict(*width_epochs(spec, hparams, share=distill_share(spec, trials) if distils else 0.0))


def fit(spec: SearchSpec, trials: Sequence[StoredTrial]) -> WorkModel | None:
    """The work model of the complete trials that ran every epoch (None when there are none)."""
    points: list[tuple[str, float, float]] = []
    for t in trials:
        rec = t.record
        work = float(rec.get("work_s") or 0.0)
        if t.state != "complete" or rec.get("duplicate_of") is not None or work <= 0 or t.interrupted:
            continue
        try:
            distilled = rec.get("distill_epochs")  # None: a record from before the column (it distilled throughout)
            method, x = width_epochs(spec, t.hparams, None if distilled is None else int(distilled))
        except Exception as exc:  # noqa: BLE001 - a trial of another space version: not evidence
            log.debug("work model: trial %d left out: %s", t.number, exc)
            continue
        if int(rec.get("epochs_run") or 0) < int(float(t.hparams.get("epochs", 0) or 0)):
            continue
        points.append((method, x, work))
    if not points:
        return None
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 1e-12 else 0.0
    intercept = my - slope * mx
    if sxx <= 1e-12 or slope <= 0 or intercept < 0:  # one width, or a fit that makes no sense: proportional
        slope = sum(ys) / max(sum(xs), 1e-9)
        intercept = 0.0
    base = WorkModel(intercept, slope, {})
    scale = {}
    for method in {p[0] for p in points}:
        ratios = [w / base.predict(method, x) for m, x, w in points if m == method and base.predict(method, x) > 0]
        if ratios:
            scale[method] = statistics.median(ratios)
    return WorkModel(intercept, slope, scale)


def _low(value: Any) -> float:
    if isinstance(value, Range):
        return float(value.low)
    if isinstance(value, list):
        return min(float(v) for v in value)
    return float(value)


def _variants(spec: SearchSpec, method: str) -> list[dict[str, Any]]:
    """Method parameters to try for the cheapest configuration: the defaults, and each searched or fixed
    parameter of the space at each of its choices or range ends (one at a time)."""
    out: list[dict[str, Any]] = [{}]
    for name, value in spec.method_space.get(method, {}).items():
        ends = [value.low, value.high] if isinstance(value, Range) else value if isinstance(value, list) else [value]
        out += [{f"{method}.{name}": v} for v in ends]
    return out


def cheapest(spec: SearchSpec, model: WorkModel) -> float:
    """The predicted work of the cheapest configuration the space allows: each method (at its default
    parameters and each parameter's extremes), the fewest epochs, the lowest target, no distillation."""
    hp = {"target": _low(spec.space["target"]), "epochs": int(_low(spec.space["epochs"])), "lr": 0.01}
    costs = []
    for m in spec.methods:
        for variant in _variants(spec, m):
            try:
                costs.append(model.predict(*width_epochs(spec, {**hp, "method": m, **variant}, distilled=0)))
            except Exception as exc:  # noqa: BLE001 - a combination the method refuses is not a configuration
                log.debug("work model: %s %s left out: %s", m, variant, exc)
    return min(costs, default=0.0)


def admit(spec: SearchSpec, store: TrialStore, hparams: Mapping[str, Any],
          limit_s: float | None) -> tuple[bool, float | None, float]:
    """Whether a trial with ``hparams`` may start under a compute budget of ``limit_s`` measured seconds of
    ``store``'s search: (admitted, its predicted seconds or None, seconds left). Always admitted without a
    budget or a work model."""
    if limit_s is None:
        return True, None, math.inf
    trials = store.trials()
    left = limit_s - work_used(store, trials)
    model = fit(spec, trials)
    if model is None:
        return True, None, left
    try:
        predicted = predict(spec, model, trials, hparams)
    except Exception as exc:  # noqa: BLE001 - parameters the method refuses: the trial runs and fails as such
        log.debug("work model: no prediction for %s: %s", dict(hparams), exc)
        return True, None, left
    return predicted <= left, predicted, left


def stop_reason(spec: SearchSpec, store: TrialStore, limit_s: float | None) -> str | None:
    """``"compute"`` when even the cheapest configuration the space allows is predicted not to fit in what
    is left of a compute budget of ``limit_s`` measured seconds, else None."""
    if limit_s is None:
        return None
    trials = store.trials()
    model = fit(spec, trials)
    if model is None or cheapest(spec, model) <= limit_s - work_used(store, trials):
        return None
    return "compute"


def idle_reason(repeats: int, skips: int, max_repeats: int) -> str | None:
    """Why a worker stops after proposals in a row that ran nothing (``repeats`` reused results, ``skips``
    trials the budget could not pay for), or None: ``compute`` (the budget paid for none of them) or
    ``exhausted`` (every one a configuration that already ran: the space looks covered)."""
    if skips >= MAX_SKIPS or (skips and repeats + skips >= max_repeats):
        return "compute"
    if repeats >= max_repeats:
        log.warning("the sampler proposed %d configurations in a row that already ran; the search space "
                    "looks exhausted: stopping", repeats)
        return "exhausted"
    return None


def skipped_result(spec: SearchSpec, number: int, hparams: Mapping[str, Any], predicted: float, left: float,
                   loud: bool = True) -> TrialResult:
    """Trial ``number``, not started: its predicted work exceeds the budget left (module docstring);
    ``loud``: say so as a warning (the first of a row), else at INFO."""
    log.log(logging.WARNING if loud else logging.INFO, "trial %d (%s) not started: its work is predicted at %.0f s "
            "and %.0f s of budget.compute are left", number, hparams.get("method"), predicted, max(0.0, left))
    return TrialResult(number=number, state="early_stopped", hparams=dict(hparams), objectives=tuple(spec.objectives),
                       stopped_at=NOT_STARTED, work_s=0.0)
