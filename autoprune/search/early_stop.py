"""Early stopping and screening that respect both objectives (DESIGN.md section 5).

Optuna's pruners refuse multi-objective studies and a scalar scheduler would compare a small
model with a large one. But a pruned model's cost (MACs, params or latency) is known before its
fine-tuning starts, so a trial only has to keep up with the finished trials that are at least as
cheap, *at the same point of a comparable schedule*:

    after epoch e >= min_epochs (not the last), stop the trial if its validation accuracy is below
    max(accuracy of the finished trials with cost <= this trial's cost, at the same position) - margin,
    provided at least ``min_trials`` such finished trials measured that position.

**Position.** Each epoch of a trial belongs to a *phase*: ``"finetune"`` (after surgery; the learning
rate follows a cosine over the phase's epochs) or ``"train:<method>"`` (a method that trains while
pruning, ResRep's compactor epochs). Epoch e's position is (phase, fraction of that phase done), so
a 20-epoch trial at epoch 10 (fraction 0.5, learning rate still high) is compared with a 10-epoch
trial at its epoch 5, not with its annealed epoch 10; and ResRep's compactor epochs are compared only
with other ResRep trials' compactor epochs. A peer's accuracy between two of its measured fractions is
interpolated linearly (accuracy curves are concave, so this under-estimates the peer and stops less);
its fine-tune phase starts at fraction 0 with its *fidelity* (accuracy right after surgery and BN
recalibration) when that was measured. A peer that measured nothing at or before the position is
skipped.

**Margin.** ``margin=None`` (the default) is ``se_multiple`` (default 1) standard errors of an
accuracy on the validation split, ``sqrt(p (1 - p) / n_val)`` at the reference accuracy p (clipped
to one image from 0 and 1): 0.9 points on 359 images at p = 0.97, 0.55 points on 3000 at p = 0.9.
One standard error, not two: the margin only has to protect a trial that is truly *ahead* of the
cheaper peer (a trial truly equal to it is dominated and adds nothing to the front); one truly
ahead by one standard error is stopped about 8 % of the time. Measured by replaying a 40-trial
Fashion-MNIST search with every epoch recorded (its trials in order, with screening at keep 0.3,
min_peers 2): together with screening, 1 SE saves 40 % of the fine-tune epochs at -0.10 %
hypervolume, 2 SE 34 % at -0.05 %.

**Cost tolerance.** A finished trial up to ``cost_tolerance`` (relative, default 1 %) more expensive
still counts as "no more expensive": trials sampled at the same MACs target land a fraction of a
percent above or below it (channel granularity), and excluding the ones that happen to land 0.1 %
higher would let a trial that is beaten at its own target run on. A point that much cheaper adds
at most ``cost_tolerance`` x its cost x its accuracy to the front's hypervolume.

**Judged only at the end.** A training-time method whose per-epoch reading is not yet the model it
would return is never stopped during its training phase (:data:`JUDGED_AT_END`): ResRep's compactor
epochs read 12-16 % on a natural-image set where the same trial finished at 59 % (issue 25), so
comparing them would stop trials that are ahead. Its fine-tune epochs after the fold (if any) and
its result are judged as any other trial's. Since the engine's one training loop, ResRep's reading
is the model it would return at that point (tested: stopped after epoch e it returns a model that
reads the same to the image); whether its mid-way ranking predicts its final one is not measured
yet, so it stays judged at its end.

A trial cheaper than everything finished is never stopped (nothing to compare with), so the
low-cost end of the front is always explored. The last epoch is never a stopping point: stopping
there saves nothing and would hide a finished result. Early-stopped trials never reach the front.

**Screening** (:func:`screen_out`) is the zero-training rung of the same idea: a candidate's fidelity
is compared with the fidelities of the candidates already screened within ``bucket / 2`` of its cost
fraction (a window centred on it, so candidates at one MACs target always share it); unless it is
among the best ``keep`` share of them, it is not fine-tuned. As for early stopping, only differences
beyond the margin count: a candidate is screened out only if enough candidates are ahead of it by
more than ``se_multiple`` standard errors of an accuracy on the validation split (never by one
image in 3,000).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FINETUNE = "finetune"
ONESHOT = "oneshot"  # the screening phase of a candidate that did not train before surgery
DEFAULT_SE_MULTIPLE = 1.0
DEFAULT_COST_TOLERANCE = 0.01
# training-time methods whose mid-training reading is not (yet) the model they would return: their
# training epochs are never a stopping point (issue 25: ResRep's compactor epochs read near chance)
JUDGED_AT_END: frozenset[str] = frozenset({"resrep"})


def train_phase(method: str) -> str:
    """The phase name of a training-time method's epochs (compared only with the same method's)."""
    return f"train:{method}"


@dataclass(frozen=True)
class Peer:
    """A finished (complete) trial as the rule sees it."""

    cost: float
    curve: tuple[float | None, ...]  # val acc after each epoch of the trial (None: not measured)
    phases: tuple[str, ...] = ()  # the phase of each epoch; () = every epoch is a fine-tune epoch
    fidelity: float | None = None  # val acc right after surgery + BN recalibration (fine-tune fraction 0)


def schedule(total_epochs: int, training_epochs: int = 0, method: str = "") -> tuple[str, ...]:
    """The phase of each epoch of a trial: ``training_epochs`` of ``train:<method>``, then fine-tune."""
    k = max(0, min(int(training_epochs), int(total_epochs)))
    return (train_phase(method),) * k + (FINETUNE,) * (int(total_epochs) - k)


def judged_midway(phase: str, judged_at_end: Iterable[str] = JUDGED_AT_END) -> bool:
    """False for the training phase of a method in ``judged_at_end`` (no stopping inside it)."""
    return not (phase.startswith("train:") and phase[len("train:"):] in set(judged_at_end))


def screening_phase(phases: Sequence[str]) -> str:
    """The phase a candidate's fidelity belongs to: ``oneshot``, or ``train:<method>`` when it trained
    before surgery (ResRep's compactor epochs), so it is screened only against its own kind."""
    return phases[0] if phases and phases[0] != FINETUNE else ONESHOT


def position(phases: Sequence[str], epoch: int) -> tuple[str, float]:
    """(phase, fraction of that phase done) after 1-based ``epoch`` of a trial with ``phases``."""
    if not 1 <= epoch <= len(phases):
        raise ValueError(f"epoch {epoch} is outside the schedule of {len(phases)} epochs")
    phase = phases[epoch - 1]
    done = sum(1 for p in phases[:epoch] if p == phase)
    return phase, done / sum(1 for p in phases if p == phase)


def _as_peer(p: Peer | tuple) -> Peer:
    return p if isinstance(p, Peer) else Peer(float(p[0]), tuple(p[1]))


def peer_accuracy(peer: Peer, phase: str, fraction: float) -> float | None:
    """``peer``'s accuracy at ``fraction`` of its ``phase`` (interpolated), or None if not measured."""
    phases = peer.phases or (FINETUNE,) * len(peer.curve)
    n = sum(1 for p in phases if p == phase)
    if n == 0:
        return None
    points: list[tuple[float, float]] = []
    if phase == FINETUNE and peer.fidelity is not None and math.isfinite(peer.fidelity):
        points.append((0.0, float(peer.fidelity)))
    j = 0
    for p, acc in zip(phases, peer.curve):
        if p != phase:
            continue
        j += 1
        if acc is not None and math.isfinite(acc):
            points.append((j / n, float(acc)))
    eps = 1e-9
    for (f0, a0), (f1, a1) in itertools.pairwise(points):
        if f0 - eps <= fraction <= f1 + eps:
            return a0 + (a1 - a0) * (fraction - f0) / (f1 - f0) if f1 > f0 else a1
    if len(points) == 1 and abs(points[0][0] - fraction) <= eps:
        return points[0][1]
    if points and abs(points[-1][0] - fraction) <= eps:
        return points[-1][1]
    return None


def peers_at(cost: float, phase: str, fraction: float, finished: Iterable[Peer | tuple],
             cost_tolerance: float = 0.0) -> list[float]:
    """Accuracies at (``phase``, ``fraction``) of the finished trials with cost <= ``cost`` x (1 +
    ``cost_tolerance``) that measured it."""
    out = []
    for peer in map(_as_peer, finished):
        if peer.cost is None or not peer.cost <= cost * (1.0 + cost_tolerance):
            continue
        acc = peer_accuracy(peer, phase, fraction)
        if acc is not None:
            out.append(acc)
    return out


def accuracy_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` images (p clipped one image from 0 and 1)."""
    if n < 1:
        raise ValueError("the validation split is empty")
    p = min(max(float(p), 1.0 / n), 1.0 - 1.0 / n) if n > 1 else 0.5
    return math.sqrt(p * (1.0 - p) / n)


def margin_for(reference: float, n_val: int | None, margin: float | None,
               se_multiple: float = DEFAULT_SE_MULTIPLE) -> float:
    """The margin in accuracy: ``margin`` when set, else ``se_multiple`` standard errors at ``reference``."""
    if margin is not None:
        return float(margin)
    if not n_val:
        raise ValueError("an automatic margin needs the size of the validation split (n_val)")
    return se_multiple * accuracy_se(reference, int(n_val))


def threshold(cost: float, phase: str, fraction: float, finished: Iterable[Peer | tuple], *,
              margin: float | None = None, n_val: int | None = None, se_multiple: float = DEFAULT_SE_MULTIPLE,
              min_trials: int = 3, cost_tolerance: float = DEFAULT_COST_TOLERANCE) -> float | None:
    """The accuracy a trial must reach at (``phase``, ``fraction``) to continue, or None (no rule yet)."""
    peers = peers_at(cost, phase, fraction, finished, cost_tolerance)
    if len(peers) < max(1, min_trials):
        return None
    best = max(peers)
    return best - margin_for(best, n_val, margin, se_multiple)


def should_stop(cost: float, epoch: int, acc: float, finished: Iterable[Peer | tuple], *,
                phases: Sequence[str], margin: float | None = None, n_val: int | None = None,
                se_multiple: float = DEFAULT_SE_MULTIPLE, min_epochs: int = 1, min_trials: int = 3,
                cost_tolerance: float = DEFAULT_COST_TOLERANCE,
                judged_at_end: Iterable[str] = JUDGED_AT_END) -> bool:
    """True when a trial of ``cost`` (schedule ``phases``) with accuracy ``acc`` after ``epoch`` should stop.

    ``finished`` holds the COMPLETE trials only (:class:`Peer`, or ``(cost, curve)`` of an all-fine-tune
    schedule); never early-stopped or failed ones: their curves end early or mean nothing. A
    non-finite accuracy stops the trial once peers exist (NaN compares false everywhere).
    """
    if epoch < min_epochs or epoch >= len(phases):
        return False
    phase, fraction = position(phases, epoch)
    if not judged_midway(phase, judged_at_end):
        return False
    bar = threshold(cost, phase, fraction, finished, margin=margin, n_val=n_val, se_multiple=se_multiple,
                    min_trials=min_trials, cost_tolerance=cost_tolerance)
    if bar is None:
        return False
    return not math.isfinite(acc) or acc < bar


# ------------------------------------------------------------------------------------ screening


def round_key(method: str, target: float, allocation: str) -> str:
    """The configuration a screening-round point measured (:mod:`autoprune.search.rounds`): a trial of
    the same (method, target, allocation) is not screened against it (the same model, measured again)."""
    return f"{method}|{float(target):.6g}|{allocation}"


@dataclass(frozen=True)
class Candidate:
    """A trial's zero-training rung: its cost fraction, fidelity and the phase the fidelity was taken in."""

    cost_frac: float
    fidelity: float
    phase: str = ONESHOT  # ONESHOT (no training before surgery) or train:<method> (after its training)
    config: str = ""  # the screening round's (method, target, allocation) key; "" for a trial


@dataclass(frozen=True)
class Reference:
    """What a running trial compares itself with (:func:`autoprune.search.store.finished_curves`)."""

    peers: tuple[Peer, ...] = ()  # complete trials: the early-stopping reference
    candidates: tuple[Candidate, ...] = ()  # every trial with a fidelity: the screening reference


def screen_out(cost_frac: float, fidelity: float, earlier: Iterable[Candidate], *, keep: float,
               bucket: float = 0.1, min_peers: int = 3, phase: str = ONESHOT, n_val: int | None = None,
               se_multiple: float = 0.0, config: str = "") -> bool:
    """True when a candidate should NOT be fine-tuned: among the ``earlier`` candidates of the same
    ``phase`` whose cost fraction is within ``bucket / 2`` of its own, at least
    ``min_peers`` exist and it is not in the best ``keep`` share of them and itself (the best of a
    bucket is always kept). Only candidates ahead by more than ``se_multiple`` standard errors (of an
    accuracy at ``fidelity`` on ``n_val`` validation images; 0 or no ``n_val``: any difference) count
    as ahead, so a candidate one image behind is never screened out. A screening-round candidate with
    the same ``config`` (the same model, measured before) is left out. A successive-halving first rung that is valid for two
    objectives: candidates compete only with candidates of about the same cost. A non-finite
    fidelity is screened out once peers exist.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"screen keep share {keep} must be in (0, 1]")
    if keep >= 1:
        return False
    same = [c.fidelity for c in earlier
            if c.phase == phase and not (config and c.config == config) and abs(c.cost_frac - cost_frac) <= bucket / 2 + 1e-9 and math.isfinite(c.fidelity)]
    if len(same) < max(1, min_peers):
        return False
    if not math.isfinite(fidelity):
        return True
    m = margin_for(fidelity, n_val, None, se_multiple) if (n_val and se_multiple > 0) else 0.0
    rank = 1 + sum(1 for f in same if f > fidelity + m)  # clearly ahead of it, among the earlier ones and itself
    return rank > max(1.0, keep * (len(same) + 1))  # the best of a bucket always goes on
