"""Study reports: read trials.csv, write pareto.csv / importance.csv / report.md (and, through
:mod:`autoprune.report.plots`, pareto.png / pareto.html).

The numbers come from :mod:`autoprune.report.pareto` (pure); this module only reads and writes files, each
written to a temporary name and renamed (:mod:`autoprune.files`): a full disk leaves the previous
file, never a truncated one, and says so in one line.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import AutopruneError
from ..files import atomic_path, os_error, write_text
from .importance import SHARE_SUFFIX
from .pareto import (
    FRACTION_COLUMNS,
    NOT_STARTED,
    OBJECTIVE_COLUMNS,
    TRIALS_CSV,
    front_hypervolume,
    front_mask,
)
from .plots import _acc_scale, cost_unit, normalise, plot_pareto

__all__ = ["ReportPaths", "load_trials", "plot_pareto", "read_base", "write_report"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportPaths:
    pareto_csv: str
    pareto_png: str
    pareto_html: str
    report_md: str
    importance_csv: str | None


Paths = ReportPaths


# --------------------------------------------------------------------------- reading


def trials_csv(path: str | os.PathLike) -> str:
    """``path`` (a results folder, or a trials.csv itself) -> its trials.csv; a one-line AutopruneError
    when the folder or the file is missing. The one place the report resolves a study's table."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AutopruneError(f"study folder {path} does not exist (no {TRIALS_CSV}); give the --out folder of a "
                             "finished `autoprune search`")
    csv = os.path.join(path, TRIALS_CSV) if os.path.isdir(path) else path
    if not os.path.isfile(csv):
        raise AutopruneError(f"{csv} not found: {path} holds no {TRIALS_CSV}; run `autoprune search SPEC --out "
                             f"{path}` first, or resume it with --resume")
    return csv


def read_trials(path: str | os.PathLike) -> pd.DataFrame:
    """A study's trials.csv (``path``: its results folder or the file) as a table, as written."""
    return read_table(trials_csv(path))


def read_table(path: str | os.PathLike, required: Sequence[str] = ("number",), **kwargs: Any) -> pd.DataFrame:
    """A trials table written by ``autoprune search`` (``kwargs`` go to pandas.read_csv); an empty,
    garbled or foreign file is a one-line AutopruneError naming it."""
    try:
        df = pd.read_csv(path, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise AutopruneError(f"{path} is empty or not a CSV table ({type(exc).__name__}); re-run "
                             "`autoprune search --resume` to rewrite it") from None
    except OSError as exc:
        raise os_error(path, exc, "read") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise AutopruneError(f"{path} has no {missing[0]!r} column; it is not a trials table written by "
                             "`autoprune search`")
    return df


def _study_name(study_dir: str) -> str:
    info = _spec_info(study_dir)
    return str(info.get("study") or os.path.basename(os.path.normpath(study_dir)))


def _spec_info(study_dir: str) -> dict[str, Any]:
    """The resolved spec.yaml as plain data (no validation: the report must work on any old folder)."""
    path = os.path.join(study_dir, "spec.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def load_trials(dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """trials.csv of one or several study folders (or csv paths) as one table with a ``study`` column."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    frames = []
    for d in dirs:
        csv = trials_csv(d)
        df = normalise(read_table(csv))
        if "study" not in df.columns:
            df.insert(0, "study", _study_name(os.path.dirname(csv) or "."))
        frames.append(df)
    if not frames:
        raise AutopruneError("no study folders given")
    return pd.concat(frames, ignore_index=True)


def read_base(study_dir: str | os.PathLike) -> dict[str, Any]:
    """Base metrics of a study: base.pt's metrics if readable; MACs/params recovered from the trials
    (``macs / macs_frac``) when base.pt lacks them."""
    study_dir = os.fspath(study_dir)
    out: dict[str, Any] = {}
    path = os.path.join(study_dir, "base.pt")
    if os.path.isfile(path):
        try:
            import torch

            metrics = torch.load(path, map_location="cpu", weights_only=True).get("metrics") or {}
            out.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        except Exception as exc:  # noqa: BLE001 - the report must not fail on an odd checkpoint
            log.warning("could not read base metrics from %s: %s", path, exc)
    csv = os.path.join(study_dir, TRIALS_CSV)
    if os.path.isfile(csv) and any(out.get(k) is None for k in ("macs", "params")):
        out = _complete_base(out, normalise(read_table(csv)))
    return out


def _complete_base(base: Mapping[str, Any] | None, df: pd.DataFrame) -> dict[str, Any]:
    """Fill base macs/params from ``macs / macs_frac`` of the trials when the caller did not give them."""
    base = dict(base or {})
    for obj, frac in FRACTION_COLUMNS.items():
        col = OBJECTIVE_COLUMNS[obj]
        if base.get(col) is None and {col, frac} <= set(df.columns):
            ratio = (pd.to_numeric(df[col], errors="coerce") / pd.to_numeric(df[frac], errors="coerce")).dropna()
            ratio = ratio[np.isfinite(ratio)]
            if len(ratio):
                base[col] = float(ratio.median())
    return base


# --------------------------------------------------------------------------- the report


def write_report(study_dir: str | os.PathLike, base: Mapping[str, Any] | None = None,
                 importance: Mapping[str, Mapping[str, float]] | None = None) -> ReportPaths:
    """Write pareto.csv, pareto.png, pareto.html, report.md (and importance.csv when ``importance``,
    objective -> parameter -> importance, is given) into ``study_dir`` from its trials.csv.

    ``base``: the base model's metrics (val_acc, macs, params); missing ones are read from base.pt
    and recovered from the trials (macs / macs_frac). pareto.csv holds trials.csv's rows verbatim.
    """
    study_dir = os.fspath(study_dir)
    csv = trials_csv(study_dir)
    columns = ("number", "state", "val_acc")
    raw = read_table(csv, columns, dtype=str, keep_default_na=False)
    df = normalise(read_table(csv, columns))
    info = _spec_info(study_dir)
    objectives = info.get("objectives") or ["val_acc", "macs"]
    objective = objectives[1] if len(objectives) > 1 and objectives[1] in OBJECTIVE_COLUMNS else "macs"
    study = _study_name(study_dir)
    base = _complete_base({**read_base(study_dir), **{k: v for k, v in (base or {}).items() if v is not None}}, df)
    col = OBJECTIVE_COLUMNS[objective]
    on = df[front_mask(df, objective)]
    on = on.sort_values([col, "val_acc", "number"] if "number" in on.columns else [col, "val_acc"],
                        ascending=[True, False, True][: 3 if "number" in on.columns else 2], kind="mergesort")
    paths = ReportPaths(*(os.path.join(study_dir, n) for n in ("pareto.csv", "pareto.png", "pareto.html",
                                                                 "report.md")), importance_csv=None)
    with atomic_path(paths.pareto_csv) as tmp:
        raw.loc[on.index].to_csv(tmp, index=False)
    plot_pareto({study: df}, paths.pareto_png, paths.pareto_html, {study: base}, objective=objective)
    imp_path = os.path.join(study_dir, "importance.csv")
    if importance:
        table = pd.DataFrame({obj + SHARE_SUFFIX: pd.Series(dict(vals), dtype=float)
                              for obj, vals in importance.items()})
        table.index.name = "param"
        with atomic_path(imp_path) as tmp:
            table.sort_values(table.columns[0], ascending=False).to_csv(tmp)
    elif os.path.isfile(imp_path):
        table = read_table(imp_path, ("param",)).set_index("param")
        importance = {c.removesuffix(SHARE_SUFFIX): table[c].dropna().to_dict() for c in table.columns}
    paths = ReportPaths(paths.pareto_csv, paths.pareto_png, paths.pareto_html, paths.report_md,
                        imp_path if importance else None)
    write_text(paths.report_md, _markdown(study, info, df, on, base, objective, importance))
    log.info("report written to %s", study_dir)
    return paths


def _num(v: Any, fmt: str = ".4g") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return "" if math.isnan(f) else format(f, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _markdown(study: str, info: Mapping[str, Any], df: pd.DataFrame, on: pd.DataFrame, base: Mapping[str, Any],
              objective: str, importance: Mapping[str, Mapping[str, float]] | None) -> str:
    acc = _acc_scale(df)
    out = [f"# Study {study}\n"]
    data = info.get("data")
    data = data.get("name") if isinstance(data, dict) else data
    if info:
        out.append(f"Model `{info.get('model', '?')}` on `{data or '?'}`; objectives: validation accuracy (max), "
                   f"{objective} (min). Resolved spec: `spec.yaml`.\n\n")
    if base:
        parts = []
        if base.get("val_acc") is not None:
            parts.append(f"val acc {_num(float(base['val_acc']) * (100 if base['val_acc'] <= 1 else 1), '.2f')} %")
        for key, what in (("macs", "MACs"), ("params", "params")):
            if base.get(key) is not None:
                unit, div = cost_unit(base[key])
                parts.append(f"{_num(base[key] / div, '.4g')} {unit}{' ' if unit else ''}{what}")
        out.append(f"Base model: {', '.join(parts)}.\n\n")
    states = df["state"].value_counts() if "state" in df.columns else pd.Series({"complete": len(df)})
    counts = ", ".join(f"{s} {int(states.get(s, 0))}" for s in ("complete", "early_stopped", "failed", "running"))
    if states.get("interrupted"):
        counts += f", interrupted {int(states['interrupted'])}"
    never = int((df["stopped_at"] == NOT_STARTED).sum()) if "stopped_at" in df.columns else 0
    if never:  # early-stopped before they started (search/admission.py)
        counts += f"; {never} of the early-stopped not started: predicted over what budget.compute had left"
    infeasible = int(((df.get("state") == "complete") & ~df["feasible"]).sum()) if "feasible" in df.columns else 0
    out.append(f"Trials: {len(df)} ({counts}); complete but infeasible: {infeasible}.")
    if "epochs_run" in df.columns:
        out.append(f" Epochs run in all: {_num(df['epochs_run'].sum(), '.0f')}.")
    if "duration_s" in df.columns:
        out.append(f" Trial time in all: {_num(df['duration_s'].sum() / 60, '.1f')} min.")
    if "work_s" in df.columns and pd.to_numeric(df["work_s"], errors="coerce").notna().any():
        out.append(f" Measured work in all (CPU time, or GPU time on a GPU): "
                   f"{_num(pd.to_numeric(df['work_s'], errors='coerce').sum() / 60, '.1f')} min.")
    hv = front_hypervolume(df, objective)
    if not math.isnan(hv):
        out.append(f"\n\nHypervolume of the front (val acc x {objective} fraction of base, reference (0, 1)): "
                   f"{hv:.4f}.")
    out.append(f"\n\n## Pareto front ({len(on)} trials)\n\n")
    col = OBJECTIVE_COLUMNS[objective]
    frac = FRACTION_COLUMNS.get(objective)
    unit, div = cost_unit(base.get(col)) if objective != "latency" else ("", 1.0)
    if objective != "latency" and not base.get(col):  # no base: the largest trial stands in for it
        unit, div = cost_unit(pd.to_numeric(df.get(col), errors="coerce").max() if col in df.columns else None)
    what = "MACs" if objective == "macs" else "params"
    setting = f"; {base['latency_setting']}" if base.get("latency_setting") else ""
    cost_head = f"latency (ms{setting})" if objective == "latency" else (f"{what} ({unit})" if unit else what)
    header = ["trial", "method", "val acc (%)", cost_head] + (["% of base"] if frac else []) + \
             ["target", "allocation", "epochs", "lr", "model"]
    rows = []
    for _, r in on.iterrows():
        cost = r.get(col) if objective == "latency" else (r.get(col) or np.nan) / div
        rows.append([_num(r.get("number"), ".0f"), r.get("method", ""), _num(r.get("val_acc", np.nan) * acc, ".2f"),
                     _num(cost)] + ([_num(r.get(frac, np.nan) * 100, ".1f")] if frac else [])
                    + [_num(r.get("target"), ".3g"), r.get("allocation", ""), _num(r.get("epochs"), ".0f"),
                       _num(r.get("lr"), ".3g"), r.get("model", "") if isinstance(r.get("model"), str) else ""])
    out.append(_table(header, rows) if rows else "No complete feasible trial yet.\n")
    out.append("\n![Pareto front](pareto.png) (interactive: `pareto.html`)\n")
    out.append(_importance_md(df, importance, objective))
    out.append(_fidelity_md(df))
    if "error" in df.columns and "state" in df.columns:
        failed = df[(df["state"] == "failed")]
        if len(failed):
            out.append("\n## Failed trials\n\n")
            for _, r in failed.head(20).iterrows():
                err = str(r.get("error", "")).splitlines()[0][:200] if isinstance(r.get("error"), str) else ""
                out.append(f"- trial {_num(r.get('number'), '.0f')} ({r.get('method', '?')}): {err}\n")
        stopped = df[df["state"] == "interrupted"]
        if len(stopped):
            numbers = ", ".join(_num(n, ".0f") for n in stopped["number"].head(50))
            out.append(f"\n## Interrupted trials\n\nStopped before they finished (Ctrl-C, `kill`, a lost worker); "
                       f"each ran again, or runs again on `--resume`, under a new number: {numbers}.\n")
    return "".join(out)


def _complete(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"] == "complete"] if "state" in df.columns else df


def _importance_md(df: pd.DataFrame, importance: Mapping[str, Mapping[str, float]] | None, objective: str) -> str:
    """The importance table with its label, or why there is none; parameters that set an objective by
    construction (the MACs target and MACs) are named below the table."""
    from .importance import LABEL, MIN_TRIALS, by_construction

    out = ["\n## Parameter importance\n\n"]
    done = _complete(df)
    if not importance:
        out.append(f"Not enough trials: {len(done)} complete, parameter importance (fANOVA) needs at least "
                   f"{MIN_TRIALS}.\n")
        return "".join(out)
    objs = list(importance)
    params = sorted({p for v in importance.values() for p in v}, key=lambda p: -float(importance[objs[0]].get(p, 0.0)))
    out.append(_table(["parameter", *(f"{o} share" for o in objs)],
                      [[p, *(_num(importance[o].get(p), ".3f") for o in objs)] for p in params]))
    out.append(f"\n{LABEL}.\n")
    col = OBJECTIVE_COLUMNS[objective]
    if col in done.columns:
        columns = {p: done[p] if p in done.columns else done.get(f"param_{p}") for p in params}
        fixed = by_construction({p: c for p, c in columns.items() if c is not None}, done[col])
        for p in fixed:
            out.append(f"\n`{p}` sets {objective} by construction (|Spearman| >= 0.98 over the complete trials: the "
                       f"allocator hits the target): its share of the {objective} column confirms that, it says "
                       "nothing about which settings trade accuracy for cost well.\n")
    return "".join(out)


MIN_FIDELITY_TRIALS = 5  # complete trials with a fidelity before its rank correlation is reported


def _fidelity_md(df: pd.DataFrame) -> str:
    """Spearman rank correlation of the fidelity (val acc right after pruning + BN recalibration) with
    the final val acc of the complete trials, when at least MIN_FIDELITY_TRIALS have both."""
    if "fidelity" not in df.columns or "val_acc" not in df.columns:
        return ""
    done = _complete(df)
    both = done[pd.to_numeric(done["fidelity"], errors="coerce").notna() & done["val_acc"].notna()]
    if len(both) < MIN_FIDELITY_TRIALS:
        return ""
    rho = spearman(both["fidelity"], both["val_acc"])
    out = [(f"\n## Zero-training fidelity\n\nSpearman rank correlation of the accuracy right after pruning and BN "
           f"recalibration (before fine-tuning) with the final val accuracy: {_num(rho, '.3f')} over {len(both)} "
           "complete trials")]
    if "method" in both.columns:
        oneshot = both[both["method"] != "resrep"]
        if len(oneshot) >= MIN_FIDELITY_TRIALS and len(oneshot) < len(both):
            out.append(f"; {_num(spearman(oneshot['fidelity'], oneshot['val_acc']), '.3f')} over the {len(oneshot)} "
                       "one-shot trials (ResRep's is measured after its compactor epochs)")
    out.append(".\n")
    return "".join(out)


def spearman(x: Sequence[float] | pd.Series, y: Sequence[float] | pd.Series) -> float:
    """Spearman rank correlation (Pearson on average ranks); NaN when either side is constant."""
    a = pd.to_numeric(pd.Series(list(x)), errors="coerce")
    b = pd.to_numeric(pd.Series(list(y)), errors="coerce")
    ok = a.notna() & b.notna()
    if ok.sum() < 2 or a[ok].nunique() < 2 or b[ok].nunique() < 2:
        return math.nan
    return float(a[ok].rank().corr(b[ok].rank()))
