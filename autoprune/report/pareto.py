"""Pareto fronts, hypervolume and picking a trial by rule: pure functions over numbers and tables.

Nothing here draws or reads files (that is :mod:`autoprune.report.tables`), so tests check the data on
hand-made points. Conventions: a point *dominates* another when it is at least as good in every
objective and strictly better in one. Rows with a NaN objective are never on the front.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import AutopruneError

_TERM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>|==|=)\s*([^\s].*?)\s*$")
_OPS = {"<=": np.less_equal, ">=": np.greater_equal, "<": np.less, ">": np.greater}


def _as_min(points: np.ndarray | Sequence, maximize: Sequence[bool]) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        pts = pts.reshape(len(pts), -1)
    if pts.shape[1] != len(maximize):
        raise ValueError(f"points have {pts.shape[1]} objectives but maximize has {len(maximize)} entries")
    sign = np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)
    return pts * sign


def pareto_mask(points: np.ndarray | Sequence, maximize: Sequence[bool], unique: bool = False) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (n x d).

    Rows with a NaN are excluded. Exact duplicates of a non-dominated point are all on the front
    (none dominates another); with ``unique=True`` only the first (lowest index) of them is kept.
    The result depends only on the values and their order, never on sorting ties.
    """
    pts = _as_min(points, maximize)
    n = len(pts)
    valid = ~np.isnan(pts).any(axis=1) if n else np.zeros(0, dtype=bool)
    mask = valid.copy()
    idx = np.flatnonzero(valid)
    sub = pts[idx]
    for k, i in enumerate(idx):
        p = sub[k]
        dominated = np.all(sub <= p, axis=1) & np.any(sub < p, axis=1)
        if dominated.any():
            mask[i] = False
        elif unique:
            same = np.all(sub[:k] == p, axis=1)
            if same.any():
                mask[i] = False
    return mask


def hypervolume_2d(points: np.ndarray | Sequence, maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Area dominated by ``points`` (n x 2) and bounded by ``reference``, for any directions.

    Points that do not strictly beat the reference in both objectives add nothing; NaN rows are
    ignored. E.g. maximise accuracy, minimise MACs fraction, reference (0, 1).
    """
    if len(maximize) != 2:
        raise ValueError("hypervolume_2d needs exactly two objectives")
    pts = _as_min(points, maximize) if len(points) else np.zeros((0, 2))
    ref = _as_min(np.asarray([reference], dtype=float), maximize)[0]
    if np.isnan(ref).any():
        raise ValueError(f"reference point {tuple(reference)} has a NaN")
    keep = ~np.isnan(pts).any(axis=1)
    pts = pts[keep]
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
    if not len(pts):
        return 0.0
    pts = pts[pareto_mask(pts, [False, False], unique=True)]
    pts = pts[np.argsort(pts[:, 0], kind="stable")]  # x up, so y strictly down along the front
    xs = np.append(pts[1:, 0], ref[0])
    return float(np.sum((xs - pts[:, 0]) * (ref[1] - pts[:, 1])))


ACC_COST_REFERENCE = (0.0, 1.0)  # (val acc, cost as a fraction of the base): 1.0 = 100 % at zero cost


def acc_cost_hypervolume(points: np.ndarray | Sequence) -> float:
    """Hypervolume of (val acc, cost fraction of the base) points (n x 2): accuracy up, cost down,
    reference :data:`ACC_COST_REFERENCE`; 0.0 for no points."""
    return hypervolume_2d(points, [True, False], ACC_COST_REFERENCE)


def feasible_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The complete, feasible trials among trials.csv-style ``rows`` (the only ones a front may hold)."""
    return [r for r in rows if r["state"] == "complete" and _is_true(r["feasible"])]


def feasible_points(rows: Sequence[Mapping[str, Any]], column: str = "macs_frac") -> np.ndarray:
    """(val_acc, ``column``) of :func:`feasible_rows` (n x 2)."""
    ok = feasible_rows(rows)
    return np.asarray([(float(r["val_acc"]), float(r[column])) for r in ok], dtype=float).reshape(-1, 2)


# --------------------------------------------------------------------------- trial tables

TRIALS_CSV = "trials.csv"  # the trials table of a results folder (written by autoprune.search.results)
OBJECTIVE_COLUMNS = {"macs": "macs", "params": "params", "latency": "latency_ms"}  # trials.csv column
FRACTION_COLUMNS = {"macs": "macs_frac", "params": "params_frac",  # the same as a fraction of the base
                    "latency": "latency_frac"}  # measured, interleaved with the base
NOT_STARTED = "budget"  # trials.csv stopped_at of a trial the compute budget could not pay for (search/admission.py)


def not_started(row: Mapping[str, Any]) -> bool:
    """Whether a trials.csv row (or a trial's record) is a trial that was never started: the compute budget
    left could not pay for it, so it ran nothing."""
    return row.get("stopped_at") == NOT_STARTED


def front_mask(df: pd.DataFrame, objective: str = "macs") -> np.ndarray:
    """Rows of a trials table on the Pareto front: complete, feasible, non-dominated in
    (val_acc max, ``objective`` min). Early-stopped, failed and running trials never are."""
    col = OBJECTIVE_COLUMNS.get(objective, objective)
    if len(df) == 0:
        return np.zeros(0, dtype=bool)
    pool = np.ones(len(df), dtype=bool)
    if "state" in df.columns:
        pool &= (df["state"].astype(str) == "complete").to_numpy()
    if "feasible" in df.columns:
        pool &= df["feasible"].map(_is_true).to_numpy(dtype=bool)
    pts = np.column_stack([pd.to_numeric(df["val_acc"], errors="coerce").to_numpy(dtype=float),
                           pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)])
    pts[~pool] = np.nan
    return pareto_mask(pts, [True, False])


def front_hypervolume(df: pd.DataFrame, objective: str = "macs") -> float:
    """Hypervolume of a trials table's front in (val_acc, ``objective`` as a fraction of the base),
    reference (0, 1): 1.0 would be 100 % accuracy at zero cost."""
    col = FRACTION_COLUMNS.get(objective)
    if col is None or col not in df.columns or not len(df):
        return float("nan")
    on = df[front_mask(df, objective)]
    pts = np.column_stack([pd.to_numeric(on["val_acc"], errors="coerce").to_numpy(dtype=float),
                           pd.to_numeric(on[col], errors="coerce").to_numpy(dtype=float)])
    return acc_cost_hypervolume(pts)


# --------------------------------------------------------------------------- picking


_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


def _parse_value(text: str, column: str) -> float:
    """``0.4``, ``40%`` (0.4) or, for counts, ``0.5M`` / ``500K`` / ``1.2G`` (x 1e6 / 1e3 / 1e9)."""
    t = text.strip()
    scale = 1.0
    if t.endswith("%"):
        t, scale = t[:-1], 0.01
    elif t[-1:] in _SUFFIXES:
        t, scale = t[:-1], _SUFFIXES[t[-1]]
    try:
        return float(t) * scale
    except ValueError:
        raise AutopruneError(f"pick rule: {column}: {text!r} is not a number (e.g. 0.4, 40% or 0.5M)") from None


_ALIASES = {"acc": "val_acc", "accuracy": "val_acc"}


def _resolve(col: str, value: str | None, columns: list[str], op: str = "<=") -> str:
    """Shorthands users write: ``acc`` is ``val_acc``; ``macs<=40%`` / ``params<=40%`` mean the fraction of
    the base (``macs_frac``). A bare ``macs<=0.5`` is refused: 0.5 of the base and 0.5 MACs are both
    plausible readings, so the rule must say ``macs_frac<=0.5`` or ``macs<=0.5M``."""
    col = _ALIASES.get(col, col)
    if col in ("macs", "params") and value is not None:
        v = value.strip()
        if v.endswith("%") and f"{col}_frac" in columns:
            return f"{col}_frac"
        try:
            small = float(v) <= 1.0
        except ValueError:
            small = False
        if small:
            what = "MACs" if col == "macs" else "params"
            raise AutopruneError(f"pick rule {col}{op}{v}: a fraction of the base or a count? write "
                                 f"{col}_frac{op}{v} for {v} of the base model's {what}, or {col}{op}{v}M for "
                                 f"{v} million {what}")
    return col


def _is_true(v: object) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


def pick(df: pd.DataFrame, rule: str = "best") -> pd.Series:
    """The trial a rule selects; deterministic.

    ``rule`` is terms joined by ``,`` (all must hold): ``COL<=X``, ``COL>=X``, ``COL<X``, ``COL>X``
    (X may be a percentage, ``macs_frac<=40%``, or a count with a K/M/G suffix, ``macs<=0.5M``; ``acc``
    means ``val_acc``, ``macs<=40%`` means ``macs_frac<=0.4``, and a bare ``macs<=0.4`` is an error
    naming both readings), ``trial=N``, and optionally ``min=COL`` or
    ``max=COL`` for what to optimise (default ``max=val_acc``). ``best`` (or an empty rule) alone
    means the most accurate trial. Among complete, feasible trials (any complete trial when
    ``trial=N`` is given) satisfying every term, the best by the optimised column wins; ties go
    to fewer ``macs``, then higher ``val_acc``, then the lower trial number.
    """
    columns = list(df.columns)
    conds: list[tuple[str, str, float]] = []
    trial_no: int | None = None
    order_col, order_max = "val_acc", True
    for term in [t for t in (rule or "").split(",") if t.strip() and t.strip().lower() != "best"]:
        m = _TERM.match(term)
        if not m:
            raise AutopruneError(f"pick rule term {term.strip()!r} is not COL<=X, COL>=X, COL<X, COL>X, trial=N, "
                                 "min=COL or max=COL")
        col, op, value = m.groups()
        if col in ("trial", "number") and op in ("=", "=="):
            try:
                trial_no = int(value)
            except ValueError:
                raise AutopruneError(f"pick rule: trial={value!r} is not a trial number") from None
            continue
        if col in ("min", "max") and op in ("=", "=="):
            col, op, value = _resolve(value, None, columns), "order", col
        else:
            col = _resolve(col, value, columns, op)
        if col not in columns:
            raise AutopruneError(f"pick rule: unknown column {col!r}; columns: {', '.join(map(str, columns))}")
        if op == "order":
            order_col, order_max = col, value == "max"
        elif op in ("=", "=="):
            raise AutopruneError(f"pick rule term {term.strip()!r}: use <=, >=, < or > (only trial=N uses =)")
        else:
            conds.append((col, op, _parse_value(value, col)))
    if order_col not in columns:
        raise AutopruneError(f"pick rule: unknown column {order_col!r}; columns: {', '.join(map(str, columns))}")
    pool = df
    if "state" in df.columns:
        pool = pool[pool["state"].astype(str) == "complete"]
    if trial_no is not None:
        if "number" not in df.columns:
            raise AutopruneError(f"pick rule trial={trial_no}: the table has no 'number' column")
        hit = df[df["number"] == trial_no]
        if hit.empty:
            numbers = sorted(int(n) for n in df["number"].dropna())
            listed = f"{numbers[0]}..{numbers[-1]}" if numbers else "none"
            raise AutopruneError(f"pick rule: there is no trial {trial_no}; trial numbers: {listed}")
        pool = pool[pool["number"] == trial_no]
        if pool.empty:
            state = hit.iloc[0].get("state", "?")
            raise AutopruneError(f"pick rule: trial {trial_no} is {state}; only complete trials can be picked")
    elif "feasible" in df.columns:
        pool = pool[pool["feasible"].map(_is_true)]
    if pool.empty:
        raise AutopruneError("no complete feasible trial to pick from; run or resume the search, or relax "
                             "its constraints")
    ok = np.ones(len(pool), dtype=bool)
    for col, op, x in conds:
        vals = pd.to_numeric(pool[col], errors="coerce").to_numpy(dtype=float)
        ok &= _OPS[op](vals, x) & ~np.isnan(vals)
    hits = pool[ok]
    key = pd.to_numeric(hits[order_col], errors="coerce")
    hits = hits[key.notna()]
    if hits.empty:
        raise AutopruneError(f"no trial satisfies {rule!r}; closest: {_closest(pool, conds)}")
    sort_cols, ascending = [order_col], [not order_max]
    for col, asc in (("macs", True), ("val_acc", False), ("number", True)):
        if col in hits.columns and col not in sort_cols:
            sort_cols.append(col)
            ascending.append(asc)
    ranked = hits.assign(**{c: pd.to_numeric(hits[c], errors="coerce") for c in sort_cols})
    ranked = ranked.sort_values(sort_cols, ascending=ascending, kind="mergesort", na_position="last")
    return df.loc[ranked.index[0]]


def _closest(pool: pd.DataFrame, conds: list[tuple[str, str, float]], n: int = 3) -> str:
    """The ``n`` trials missing the conditions by the least (relative shortfall, summed)."""
    miss = np.zeros(len(pool))
    for col, op, x in conds:
        vals = pd.to_numeric(pool[col], errors="coerce").to_numpy(dtype=float)
        gap = vals - x if op in ("<=", "<") else x - vals
        scale = abs(x) if x != 0 else 1.0
        miss += np.where(np.isnan(vals), np.inf, np.clip(gap, 0.0, None) / scale)
    number = pool["number"].to_numpy() if "number" in pool.columns else np.arange(len(pool))
    order = np.lexsort((number, miss))[:n]
    parts = []
    for i in order:
        row = pool.iloc[i]
        shown = ", ".join(f"{col}={_fmt(row[col])}" for col in dict.fromkeys(c for c, _, _ in conds))
        parts.append(f"trial {row.get('number', i)} ({shown})" if shown else f"trial {row.get('number', i)}")
    return "; ".join(parts) or "none"


def _fmt(v: object) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)
