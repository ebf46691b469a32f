"""Step 1 of a retrain: pick one trial of a finished search (by rule or number) from its trials.csv.

The choice is :func:`autoprune.report.pareto.pick`'s (by default the most accurate complete, feasible trial
satisfying the rule; deterministic); this module reads the table and finds the trial's saved model.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import AutopruneError
from .pareto import pick

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The trial a rule selected and where its model is."""

    trial: int
    rule: str
    reason: str
    row: Mapping[str, Any]
    model_path: Path


def read_trials(study_dir: str | Path) -> pd.DataFrame:
    """``<study_dir>/trials.csv`` as a table (:func:`autoprune.report.tables.read_trials`, imported on use:
    the tables module draws plots)."""
    from .tables import read_trials as read

    return read(study_dir)


def choose_trial(study_dir: str | Path, rule: str | None = None, trial: int | None = None) -> Choice:
    """Select one trial by ``rule`` (see :func:`autoprune.report.pareto.pick`) or by number; deterministic."""
    if rule is not None and trial is not None:
        raise AutopruneError("give either a trial number or a pick rule, not both")
    if rule is not None and not rule.replace(",", " ").strip():
        raise AutopruneError(f"pick rule {rule!r} is empty; give e.g. 'macs_frac<=0.4', 'val_acc>=0.95,min=macs' "
                             "or 'best'")
    study = Path(study_dir)
    df = read_trials(study)
    text = f"trial={int(trial)}" if trial is not None else (rule or "best")
    row = pick(df, text)
    number = int(row["number"])
    if trial is not None:
        reason = f"trial {number} was asked for by number"
    else:
        reason = (f"the best complete, feasible trial satisfying {text!r} (highest val_acc unless the rule "
                  "says min=/max=; ties go to fewer MACs, then the lower trial number)")
    rel = row.get("model")
    rel = "" if rel is None or (isinstance(rel, float) and math.isnan(rel)) else str(rel).strip()
    path = study / (rel or f"models/trial_{number:04d}.pt")
    if rel and (Path(rel).is_absolute() or ".." in Path(rel).parts):
        raise AutopruneError(f"trial {number}'s model {rel!r} in trials.csv points outside the results folder "
                             f"{study}; a results folder may only name its own files: fix or remove that row")
    if not path.is_file():
        raise AutopruneError(f"trial {number}'s model {path} does not exist; searches save models of "
                             "complete trials only: pick another trial, or re-run the search into this "
                             "folder")
    clean = {str(k): _python_value(v) for k, v in row.items()}
    return Choice(trial=number, rule=text, reason=reason, row=clean, model_path=path)


def _python_value(v: Any) -> Any:
    """A trials.csv cell as a plain Python value (numpy scalars unwrapped, NaN -> None)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:  # MACs / params read back as floats
        return int(v)
    return v


def study_name(study_dir: str | Path) -> str:
    """The study's name from its ``spec.yaml``, else the folder's name."""
    study = Path(study_dir)
    try:
        import yaml

        name = (yaml.safe_load((study / "spec.yaml").read_text(encoding="utf-8")) or {}).get("study")
        if name:
            return str(name)
    except Exception:  # a name is a nicety
        log.debug("no study name in %s", study / "spec.yaml", exc_info=True)
    return study.resolve().name
