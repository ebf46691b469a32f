"""What early stopping would have saved on a finished search: replay its rules on every epoch.

Takes the results folder of a search run with early stopping and screening OFF (every trial ran all
its epochs, so every accuracy curve is complete), walks its complete trials in trial order and
applies the two rungs exactly as a search would have (:mod:`autoprune.search.early_stop`): the
fidelity rung (:func:`~autoprune.search.early_stop.screen_out`) once a one-shot trial is pruned (after
ResRep's compactor epochs for ResRep), then the epoch rungs
(:func:`~autoprune.search.early_stop.should_stop`) after each epoch, against the trials the replay
let finish. For each rule setting it reports the fine-tune epochs run (of those the search ran) and
the hypervolume of the front of the trials that finish. A replay keeps the trial order of the
original search; a real search with the rules on would have let its sampler react to the stops, so
its trials differ (``search_vs_tp`` measures that end to end).

    python -m autoprune.benchmarks.es_replay results/my_study --out results/benchmarks
    # search_vs_tp's own no-early-stopping searches: run it with --work DIR, then replay DIR/seed0/none_s0
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AutopruneError
from ..report.pareto import acc_cost_hypervolume, not_started
from ..search.early_stop import FINETUNE, Candidate, Peer, screen_out, screening_phase, should_stop
from . import common

SE_MULTIPLES = (2.0, 1.0, 0.0)
KEEPS = (1.0, 0.3)


@dataclass(frozen=True)
class Run:
    """A complete trial as the replay needs it."""

    cost: float  # the early-stopping cost (MACs)
    frac: float  # MACs fraction of the base (screening windows, hypervolume)
    fidelity: float | None
    curve: tuple[float | None, ...]  # every epoch measured; the last is the trial's final accuracy
    phases: tuple[str, ...]

    @property
    def final(self) -> float:
        return float(self.curve[-1])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Rules:
    keep: float = 0.3  # screening keep share (1: no screening)
    min_peers: int = 2
    bucket: float = 0.1
    se_multiple: float | None = 1.0  # None: no epoch rungs
    cost_tolerance: float = 0.01
    min_epochs: int = 1
    min_trials: int = 1


def replay(runs: Sequence[Run], rules: Rules, n_val: int) -> tuple[int, float]:
    """(epochs run, hypervolume of the finished trials' front) under ``rules``."""
    peers: list[Peer] = []
    candidates: list[Candidate] = []
    points: list[tuple[float, float]] = []
    epochs = 0
    for r in runs:
        phases = r.phases or (FINETUNE,) * len(r.curve)
        k = sum(p != FINETUNE for p in phases)
        ran, stopped = _run_epochs(r, phases, range(1, k + 1), peers, rules, n_val)
        epochs += ran
        if stopped:
            continue
        phase = screening_phase(phases)
        if r.fidelity is not None:
            out = rules.keep < 1 and screen_out(r.frac, r.fidelity, candidates, keep=rules.keep, bucket=rules.bucket,
                                                min_peers=rules.min_peers, phase=phase)
            candidates.append(Candidate(r.frac, r.fidelity, phase))
            if out:
                continue
        ran, stopped = _run_epochs(r, phases, range(k + 1, len(phases) + 1), peers, rules, n_val)
        epochs += ran
        if stopped:
            continue
        peers.append(Peer(r.cost, r.curve, phases, r.fidelity))
        points.append((r.final, r.frac))
    return epochs, acc_cost_hypervolume(points)


def _run_epochs(r: Run, phases: Sequence[str], epochs: Iterable[int], peers: Sequence[Peer], rules: Rules,
                n_val: int) -> tuple[int, bool]:
    """(epochs run, stopped) for ``r`` over ``epochs`` (1-based) under the epoch rungs."""
    ran = 0
    for e in epochs:
        ran += 1
        acc = r.curve[e - 1]
        if rules.se_multiple is not None and acc is not None and should_stop(
                r.cost, e, acc, peers, phases=phases, n_val=n_val, se_multiple=rules.se_multiple,
                min_epochs=rules.min_epochs, min_trials=rules.min_trials, cost_tolerance=rules.cost_tolerance):
            return ran, True
    return ran, False


def load_runs(folder: Path) -> tuple[list[Run], int]:
    """The complete trials of the search in ``folder`` (trial order) and its validation split's size."""
    from ..search.optuna_backend import open_store
    from ..search.spec import load_spec
    from ..search.study import STORAGE

    if not (folder / STORAGE).is_file() or not (folder / "spec.yaml").is_file():
        raise AutopruneError(f"{folder}: no study.db and spec.yaml; give the results folder of a finished search")
    spec = load_spec(folder / "spec.yaml")
    store = open_store(spec, folder)
    runs = []
    for t in sorted(store.trials(), key=lambda t: t.number):
        rec = t.record
        if not_started(rec):  # not started (search/admission.py): ran nothing to replay
            continue
        if t.state == "early_stopped" or (t.state == "complete" and any(a is None for a in t.curve[-1:])):
            raise AutopruneError(f"{folder}: trial {t.number} did not run every epoch; replay a search run with "
                                 "early_stop: false and no screen")
        if t.state != "complete" or t.cost is None:
            continue
        fid = rec.get("fidelity")
        runs.append(Run(float(t.cost), float(rec["macs_frac"]), None if fid is None else float(fid), tuple(t.curve),
                        tuple(rec.get("phases") or ())))
    from ..data.datasets import load_data

    return runs, len(load_data(spec.data, "cpu").val)  # the margin's standard error needs the split's size


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="results folder of a search run with early stopping and screening off")
    p.add_argument("--min-peers", type=int, default=2, help="screening min_peers (default 2)")
    args = p.parse_args(argv)
    common.setup(args)
    try:
        runs, n_val = load_runs(args.folder)
    except AutopruneError as exc:  # a wrong folder: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    full_epochs, full_hv = replay(runs, Rules(keep=1.0, se_multiple=None), n_val)
    rows = []
    for keep, se in itertools.product(KEEPS, (None, *SE_MULTIPLES)):
        if keep >= 1 and se is None:
            continue
        epochs, hv = replay(runs, Rules(keep=keep, min_peers=args.min_peers, se_multiple=se), n_val)
        rows.append({"screening keep": "off" if keep >= 1 else keep, "epoch rungs margin (SE)": "off" if se is None
                     else se, "epochs": epochs, "saved": f"{100 * (1 - epochs / full_epochs):.0f} %",
                     "HV": round(hv, 4), "HV change": f"{100 * (hv - full_hv) / full_hv:+.2f} %"})
    notes = ((f"{args.folder.name}: {len(runs)} complete trials, {full_epochs} epochs, front hypervolume "
              f"{full_hv:.4f} (val acc x MACs fraction, reference (0, 1)); validation split {n_val} images; screening "
              f"min_peers {args.min_peers}, window 0.1; epoch rungs from epoch 1, min_trials 1, cost tolerance 1 %."),
             "A replay keeps the original trial order; a search with the rules on lets its sampler react.")
    table = common.Table("", "Early-stopping rules replayed on a search that ran every epoch",
                         ("screening keep", "epoch rungs margin (SE)", "epochs", "saved", "HV", "HV change"),
                         tuple(rows), notes)
    common.write_tables(f"es_replay_{args.folder.name}", [table], args.out, common.command_line("es_replay", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
