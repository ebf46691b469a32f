"""Budget admission's work prediction replayed on recorded searches: predicted / measured work per trial.

For each search in the given ``trials.csv`` files (grouped by their ``seed`` and ``run`` columns, in trial
order), every complete trial that ran every epoch and had a finished trial before it is predicted the way
:mod:`autoprune.search.admission` would have predicted it before starting it (from the trials before it),
and the prediction is divided by the trial's measured ``work_s``. A ratio above 1 means the search would
have held back a trial that fitted; below 1, started one that then overran. Method parameters of the CSV
rows are not replayed (each method at its defaults, so ResRep's compactor epochs are all of a trial's).

    python -m autoprune.benchmarks.admission_replay results/benchmarks/search_vs_tp_fashionmnist_*_trials.csv

Files without a ``work_s`` column (searches from before measured compute) are left out.
"""
from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..search import admission
from ..search.spec import spec_from_dict
from ..search.store import StoredTrial
from . import common

SPACE = {"study": "replay", "model": "small_cnn", "data": "digits", "base": None, "device": "cpu",
         "space": {"method": ["l1", "lrf", "fsm", "resrep"], "target": [0.5, 0.3, 0.2], "allocation": "global",
                   "epochs": 3, "lr": 0.01, "distill": [0, 0.5]}}


def _trial(r: dict[str, str]) -> StoredTrial:
    hp = {"method": r["method"], "target": float(r["target"]), "epochs": int(r["epochs"]), "lr": 0.01,
          "distill": float(r.get("param_distill") or 0)}
    distilled = r.get("distill_epochs")
    rec: dict[str, Any] = {"work_s": float(r.get("work_s") or 0), "epochs_run": int(float(r.get("epochs_run") or 0)),
                           "distill_epochs": None if distilled in ("", None) else int(float(distilled)),
                           "duplicate_of": r.get("duplicate_of") or None}
    return StoredTrial(number=int(r["number"]), state=r["state"], hparams=hp, record=rec)


def replay(path: Path) -> list[float]:
    """Predicted / measured work of each replayable trial of the searches in ``path``."""
    spec = spec_from_dict(SPACE)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "work_s" not in rows[0]:
        return []
    searches: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        searches.setdefault((r.get("seed", ""), r.get("run", "")), []).append(r)
    ratios = []
    for rs in searches.values():
        before: list[StoredTrial] = []
        for r in sorted(rs, key=lambda r: int(r["number"])):
            t = _trial(r)
            model = admission.fit(spec, before)
            ran_all = t.record["epochs_run"] >= int(r["epochs"]) and t.record["work_s"] > 0
            if model is not None and t.state == "complete" and not t.record["duplicate_of"] and ran_all:
                ratios.append(admission.predict(spec, model, before, t.hparams) / t.record["work_s"])
            before.append(t)
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="trials.csv files of searches (a benchmark's _trials.csv)")
    args = p.parse_args(argv)
    common.setup(args)
    rows, everything = [], []
    for name in args.files:
        ratios = replay(Path(name))
        if not ratios:
            continue
        everything += ratios
        rows.append(_row(Path(name).name, ratios))
    if everything:
        rows.append(_row("all", everything))
    notes = (("ratio: predicted / measured work_s of a complete trial, predicted from the trials before it in "
              "its search; '> 10 % low': ratios below 0.9 (the search would have started a trial that then overran "
              "by more than a tenth of it)."),)
    table = common.Table("", "Work prediction of budget admission, replayed", ("file", "trials", "min", "median",
                                                                               "max", "> 10 % low"), tuple(rows), notes)
    common.write_tables("admission_replay", [table], args.out, common.command_line("admission_replay", argv))
    return 0


def _row(name: str, ratios: list[float]) -> dict[str, Any]:
    return {"file": name, "trials": len(ratios), "min": f"{min(ratios):.2f}", "median": f"{statistics.median(ratios):.2f}",
            "max": f"{max(ratios):.2f}", "> 10 % low": sum(r < 0.9 for r in ratios)}


if __name__ == "__main__":
    raise SystemExit(main())
