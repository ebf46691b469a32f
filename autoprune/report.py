"""Study reports: read trials.csv, write pareto.csv / pareto.png / pareto.html / report.md.

The numbers come from :mod:`autoprune.pareto` (pure); this module only reads and writes files and
draws. matplotlib runs headless (Agg); plotly is an optional extra (``pip install autoprune[plot]``)
imported only when an HTML plot is written: without it pareto.html is a short note showing the PNG.
"""
from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import AutopruneError
from .pareto import FRACTION_COLUMNS, OBJECTIVE_COLUMNS, _is_true, front_hypervolume, front_mask

log = logging.getLogger(__name__)

NUMERIC = ("number", "target", "epochs", "lr", "val_acc", "macs", "macs_frac", "params", "params_frac",
           "latency_ms", "epochs_run", "duration_s")
# No grey and no black among method/study colours: faded black means "dominated" in the legend.
METHOD_COLOURS = {"resrep": "#1f77b4", "lrf": "#ff7f0e", "fsm": "#2ca02c", "l1": "#9467bd"}
PALETTE = ("#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1f77b4", "#ff7f0e", "#2ca02c")
UNITS = (("", 1.0), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12))
PLOTLY_JS: bool | str = True  # embed plotly.js so pareto.html works offline ("cdn" for a small file)


@dataclass(frozen=True)
class ReportPaths:
    pareto_csv: str
    pareto_png: str
    pareto_html: str
    report_md: str
    importance_csv: str | None


Paths = ReportPaths


# --------------------------------------------------------------------------- reading


def _csv_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    csv = os.path.join(path, "trials.csv") if os.path.isdir(path) else path
    if not os.path.isfile(csv):
        raise AutopruneError(f"{path}: no trials.csv; run `autoprune search` first, or name a results/<study> folder")
    return csv


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "state" in df.columns:
        df["state"] = df["state"].fillna("").astype(str)
    if "feasible" in df.columns:
        df["feasible"] = df["feasible"].map(_is_true).astype(bool)
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
        csv = _csv_path(d)
        df = _normalise(pd.read_csv(csv))
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
    csv = os.path.join(study_dir, "trials.csv")
    if os.path.isfile(csv) and any(out.get(k) is None for k in ("macs", "params")):
        out = _complete_base(out, _normalise(pd.read_csv(csv)))
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


# --------------------------------------------------------------------------- plotting


def _colours(names: Sequence[str]) -> dict[str, str]:
    out, spare = {}, iter(PALETTE * 10)
    for name in sorted(set(names)):
        out[name] = METHOD_COLOURS.get(name) or next(spare)
    return out


def cost_unit(base_value: float | None) -> tuple[str, float]:
    """(prefix, divisor) for MACs or params counts of a study, chosen once from the base model's count.

    The largest SI prefix under which the base is at least 1 (1.19e6 MACs -> ("M", 1e6)); the plot,
    report.md and the CLI all use it, so one study speaks one unit. ("", 1.0) when the base is unknown.
    """
    try:
        value = float(base_value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return UNITS[0]
    if not math.isfinite(value) or value < 1:
        return UNITS[0]
    return [u for u in UNITS if value >= u[1]][-1]


def _axis(objective: str, relative: bool, base_value: float | None) -> tuple[str, str, float]:
    """(column, axis label, divisor) for the cost axis; counts in the unit of the base (:func:`cost_unit`)."""
    if objective == "latency":
        return "latency_ms", "latency (ms)", 1.0
    what = "MACs" if objective == "macs" else "params"
    if relative:
        return FRACTION_COLUMNS[objective], f"{what} (% of base)", 0.01
    unit, div = cost_unit(base_value)
    return OBJECTIVE_COLUMNS[objective], f"{what} ({unit})" if unit else what, div


def _acc_scale(df: pd.DataFrame) -> float:
    vals = pd.to_numeric(df.get("val_acc", pd.Series(dtype=float)), errors="coerce")
    return 1.0 if vals.max(skipna=True) > 1.0 + 1e-9 else 100.0  # fractions -> percent


def _categories(df: pd.DataFrame, objective: str) -> pd.Series:
    on = front_mask(df, objective)
    state = df["state"].astype(str) if "state" in df.columns else pd.Series("complete", index=df.index)
    feasible = df["feasible"].map(_is_true) if "feasible" in df.columns else pd.Series(True, index=df.index)
    cat = np.where(on, "front", np.where(state == "complete", np.where(feasible, "dominated", "infeasible"), state))
    return pd.Series(cat, index=df.index)


def _hover(row: pd.Series, cat: str) -> str:
    skip = {"study", "number", "state", "feasible", "error", "model"}
    lines = [f"<b>trial {row.get('number')}</b> ({cat})"]
    for key, value in row.items():
        if key in skip or value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
            continue
        lines.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if isinstance(row.get("error"), str) and row.get("error"):
        lines.append(f"error: {html.escape(row['error'][:200])}")
    return "<br>".join(lines)


STYLES = {  # category -> (marker, filled, alpha, size, label)
    "front": ("o", True, 1.0, 70, "Pareto front"),
    "dominated": ("o", True, 0.3, 30, "dominated"),
    "infeasible": ("D", True, 0.3, 25, "infeasible (constraint)"),
    "early_stopped": ("o", False, 0.45, 35, "early-stopped (hollow: accuracy when stopped)"),
    "failed": ("x", True, 0.8, 40, "failed (at the bottom)"),
}


def plot_pareto(dfs: pd.DataFrame | Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame], out_png: str,
                out_html: str | None = None, base_points: Mapping[str, Mapping[str, Any]] | None = None, *,
                objective: str = "macs", relative: bool | None = None, title: str | None = None) -> Any:
    """Accuracy vs cost of one or several studies. One study: colour by method; several: colour by
    study, cost as % of each base (unless ``relative=False``). ``base_points``: study -> base metrics.

    Absolute costs use the base's unit (:func:`cost_unit`); the accuracy axis never goes above 100 %.
    Early-stopped trials are drawn hollow and faded (their accuracy is from the epoch they stopped
    at, not a result). Returns the matplotlib Figure of the PNG.
    """
    if isinstance(dfs, pd.DataFrame):
        dfs = {str(n): g for n, g in dfs.groupby("study", sort=False)} if "study" in dfs.columns else {"": dfs}
    elif not isinstance(dfs, Mapping):
        dfs = {str(d["study"].iloc[0]) if "study" in d.columns and len(d) else f"study {i}": d
               for i, d in enumerate(dfs)}
    studies = list(dfs)
    multi = len(studies) > 1
    relative = multi if relative is None else relative
    if relative and objective not in FRACTION_COLUMNS:
        relative = False
    base_points = {k: dict(v) for k, v in (base_points or {}).items()}
    all_df = pd.concat(list(dfs.values()), ignore_index=True) if dfs else pd.DataFrame()
    base_costs = [b.get(OBJECTIVE_COLUMNS[objective]) for b in base_points.values()]
    base_costs = [float(c) for c in base_costs if isinstance(c, (int, float)) and c > 0]
    if not base_costs:  # no base known: the largest trial stands in for it
        cost_max = pd.to_numeric(all_df.get(OBJECTIVE_COLUMNS[objective], pd.Series(dtype=float)),
                                 errors="coerce").max()
        base_costs = [float(cost_max)] if pd.notna(cost_max) else []
    col, xlabel, div = _axis(objective, relative, max(base_costs, default=None))
    colour = _colours(studies if multi else list(all_df.get("method", pd.Series(dtype=str)).dropna().astype(str)))
    groups = []  # (study, df, categories, x, y)
    for study, df in dfs.items():
        df = _normalise(df.reset_index(drop=True))
        x = pd.to_numeric(df[col], errors="coerce") / div if col in df.columns else pd.Series(np.nan, index=df.index)
        y = pd.to_numeric(df["val_acc"], errors="coerce") * _acc_scale(df)
        groups.append((study, df, _categories(df, objective), x, y))
    fig = _plot_png(groups, colour, multi, base_points, col, div, xlabel, title, out_png)
    if out_html:
        _plot_html(groups, colour, multi, base_points, col, div, xlabel, title, out_html, out_png)
    return fig


def _base_xy(base: Mapping[str, Any], col: str, div: float, relative_col: bool) -> tuple[float, float] | None:
    acc = base.get("val_acc")
    x = 100.0 if relative_col else base.get(col)
    if acc is None or x is None:
        return None
    return (x if relative_col else float(x) / div), float(acc) * (100.0 if float(acc) <= 1.0 else 1.0)


def _plot_png(groups, colour, multi, base_points, col, div, xlabel, title, out_png) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    counts: dict[str, int] = {}
    failed: list[tuple[float, str]] = []
    for study, df, cat, x, y in groups:
        names = pd.Series(study, index=df.index) if multi else df.get("method", pd.Series("", index=df.index))
        names = names.fillna("").astype(str)
        for c, (marker, filled, alpha, size, _) in STYLES.items():
            counts[c] = counts.get(c, 0) + int((cat == c).sum())
            for name in sorted(names[cat == c].unique()):
                sel = (cat == c) & (names == name) & x.notna()
                rgb = colour.get(name, "k")
                if c == "failed":
                    failed += [(v, rgb) for v in x[sel]]
                    continue
                sel &= y.notna()
                ax.scatter(x[sel], y[sel], marker=marker, s=size, alpha=alpha, zorder=3 if c == "front" else 2,
                           facecolors=rgb if filled else "none", edgecolors="k" if c == "front" else rgb,
                           linewidths=1.2 if not filled or c == "front" else 0.5, clip_on=False)
        on = cat == "front"
        order = np.argsort(x[on].to_numpy(), kind="stable")
        ax.step(x[on].to_numpy()[order], y[on].to_numpy()[order], where="post", zorder=2.5, lw=1.3,
                color=colour.get(study, "k") if multi else "k", alpha=0.8)
        xy = _base_xy(base_points.get(study, {}), col, div, col.endswith("_frac"))
        if xy is not None:
            ax.scatter(*xy, marker="*", s=260, c=colour.get(study, "gold") if multi else "gold",
                       edgecolors="k", linewidths=0.8, zorder=4, clip_on=False)
    low, high = ax.get_ylim()
    if high > 100.0:  # accuracy cannot exceed 100 %; markers at 100 are drawn unclipped
        ax.set_ylim(min(low, 99.0), 100.0)
    if failed:  # no accuracy: drawn on the bottom edge at their MACs
        low = ax.get_ylim()[0]
        ax.scatter([f[0] for f in failed], [low] * len(failed), marker="x", s=40, c=[f[1] for f in failed],
                   zorder=3, clip_on=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%)")
    n_all = sum(len(g[1]) for g in groups)
    names = ", ".join(g[0] for g in groups if g[0])
    ax.set_title(title or f"{names or 'study'}: validation accuracy vs {xlabel.split(' (')[0]} "
                          f"({n_all} trials, {counts.get('front', 0)} on the front)", fontsize=10)
    ax.grid(alpha=0.3)
    colour_handles = [Line2D([], [], marker="o", ls="", color=c, label=n) for n, c in colour.items()]
    style_handles = [Line2D([], [], marker=m, ls="", color="k", alpha=max(a, 0.5), markerfacecolor="k" if f else "none",
                            label=f"{label} ({counts.get(c, 0)})") for c, (m, f, a, _, label) in STYLES.items()
                     if counts.get(c, 0)]
    style_handles.append(Line2D([], [], marker="*", ls="", markersize=12, markerfacecolor="gold",
                                markeredgecolor="k", label="base model"))
    first = ax.legend(handles=colour_handles, title="study" if multi else "method", fontsize=8,
                      loc="lower left", bbox_to_anchor=(1.01, 0.0))
    ax.add_artist(first)
    second = ax.legend(handles=style_handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    # both legends sit outside the axes: name them, or the tight box crops the one added as an artist
    fig.savefig(out_png, bbox_inches="tight", bbox_extra_artists=[first, second, ax.title])
    return fig


def _plot_html(groups, colour, multi, base_points, col, div, xlabel, title, out_html, out_png) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError:
        log.warning("plotly is not installed (pip install 'autoprune[plot]'); %s only shows the PNG", out_html)
        rel = os.path.relpath(os.path.abspath(out_png), os.path.dirname(os.path.abspath(out_html)))
        with open(out_html, "w", encoding="utf-8") as fh:
            fh.write(f"<!doctype html><html><body><p>Interactive plot needs plotly: "
                     f"<code>pip install 'autoprune[plot]'</code>, then <code>autoprune pareto DIR</code>.</p>"
                     f"<img src=\"{html.escape(rel)}\" alt=\"Pareto front\"></body></html>\n")
        return
    fig = go.Figure()
    symbols = {"front": "circle", "dominated": "circle", "infeasible": "diamond", "early_stopped": "circle-open",
               "failed": "x"}
    ys_all = pd.concat([g[4] for g in groups]) if groups else pd.Series(dtype=float)
    bottom = float(ys_all.min()) - 1.0 if ys_all.notna().any() else 0.0  # failed trials: no accuracy
    for study, df, cat, x, y in groups:
        names = pd.Series(study, index=df.index) if multi else df.get("method", pd.Series("", index=df.index))
        names = names.fillna("").astype(str)
        for name in sorted(names.unique()):
            rgb = colour.get(name, "black")
            for c, (_, _, alpha, size, label) in STYLES.items():
                sel = (cat == c) & (names == name) & x.notna() & (y.notna() | (c == "failed"))
                if not sel.any():
                    continue
                fig.add_trace(go.Scatter(
                    x=x[sel], y=y[sel].fillna(bottom), mode="markers", name=f"{name}: {label}", legendgroup=name,
                    marker={"symbol": symbols[c], "size": size ** 0.5 * 1.6, "color": rgb, "opacity": alpha,
                            "line": {"width": 1, "color": "black" if c == "front" else rgb}},
                    text=[_hover(df.loc[i], c) for i in sel.index[sel]], hoverinfo="text"))
        on = cat == "front"
        order = np.argsort(x[on].to_numpy(), kind="stable")
        prefix = f"{study}: " if multi else ""
        fig.add_trace(go.Scatter(x=x[on].to_numpy()[order], y=y[on].to_numpy()[order], mode="lines",
                                 line={"shape": "hv", "color": colour.get(study, "black") if multi else "black"},
                                 name=f"{prefix}front", hoverinfo="skip"))
        xy = _base_xy(base_points.get(study, {}), col, div, col.endswith("_frac"))
        if xy is not None:
            fig.add_trace(go.Scatter(x=[xy[0]], y=[xy[1]], mode="markers", name=f"{prefix}base model",
                                     marker={"symbol": "star", "size": 18, "color": "gold",
                                             "line": {"width": 1, "color": "black"}},
                                     text=[f"base model<br>val acc {xy[1]:.2f} %"], hoverinfo="text"))
    fig.update_layout(title=title or "validation accuracy vs " + xlabel.split(" (")[0], xaxis_title=xlabel,
                      yaxis_title="validation accuracy (%)", template="plotly_white")
    base_ys = [xy[1] for g in groups if (xy := _base_xy(base_points.get(g[0], {}), col, div, col.endswith("_frac")))]
    top = max(([float(ys_all.max())] if ys_all.notna().any() else []) + base_ys, default=0.0)
    if top >= 99.0:  # the accuracy axis stops at 100 %; markers there are drawn unclipped
        fig.update_yaxes(range=[min([bottom, *base_ys]) - 1.0, 100.0])
        fig.update_traces(cliponaxis=False)
    fig.write_html(out_html, include_plotlyjs=PLOTLY_JS, full_html=True)


# --------------------------------------------------------------------------- the report


def write_report(study_dir: str | os.PathLike, base: Mapping[str, Any] | None = None,
                 importance: Mapping[str, Mapping[str, float]] | None = None) -> ReportPaths:
    """Write pareto.csv, pareto.png, pareto.html, report.md (and importance.csv when ``importance``,
    objective -> parameter -> importance, is given) into ``study_dir`` from its trials.csv.

    ``base``: the base model's metrics (val_acc, macs, params); missing ones are read from base.pt
    and recovered from the trials (macs / macs_frac). pareto.csv holds trials.csv's rows verbatim.
    """
    study_dir = os.fspath(study_dir)
    csv = _csv_path(study_dir)
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df = _normalise(pd.read_csv(csv))
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
    raw.loc[on.index].to_csv(paths.pareto_csv, index=False)
    plot_pareto({study: df}, paths.pareto_png, paths.pareto_html, {study: base}, objective=objective)
    imp_path = os.path.join(study_dir, "importance.csv")
    if importance:
        table = pd.DataFrame({obj: pd.Series(dict(vals), dtype=float) for obj, vals in importance.items()})
        table.index.name = "param"
        table.sort_values(table.columns[0], ascending=False).to_csv(imp_path)
    elif os.path.isfile(imp_path):
        table = pd.read_csv(imp_path, index_col="param")
        importance = {c: table[c].dropna().to_dict() for c in table.columns}
    paths = ReportPaths(paths.pareto_csv, paths.pareto_png, paths.pareto_html, paths.report_md,
                        imp_path if importance else None)
    with open(paths.report_md, "w", encoding="utf-8") as fh:
        fh.write(_markdown(study, info, df, on, base, objective, importance))
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
    infeasible = int(((df.get("state") == "complete") & ~df["feasible"]).sum()) if "feasible" in df.columns else 0
    out.append(f"Trials: {len(df)} ({counts}); complete but infeasible: {infeasible}.")
    if "epochs_run" in df.columns:
        out.append(f" Epochs run in all: {_num(df['epochs_run'].sum(), '.0f')}.")
    if "duration_s" in df.columns:
        out.append(f" Trial time in all: {_num(df['duration_s'].sum() / 60, '.1f')} min.")
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
    cost_head = "latency (ms)" if objective == "latency" else (f"{what} ({unit})" if unit else what)
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
    out.append("\n## Parameter importance\n\n")
    if importance:
        objs = list(importance)
        params = sorted({p for v in importance.values() for p in v},
                        key=lambda p: -float(importance[objs[0]].get(p, 0.0)))
        out.append(_table(["parameter", *objs], [[p, *(_num(importance[o].get(p), ".3f") for o in objs)]
                                                 for p in params]))
        out.append("\nShare of each objective's variance explained by the parameter (Optuna importance).\n")
    else:
        out.append("Not computed (needs a few complete trials).\n")
    if "error" in df.columns and "state" in df.columns:
        failed = df[(df["state"] == "failed")]
        if len(failed):
            out.append("\n## Failed trials\n\n")
            for _, r in failed.head(20).iterrows():
                err = str(r.get("error", "")).splitlines()[0][:200] if isinstance(r.get("error"), str) else ""
                out.append(f"- trial {_num(r.get('number'), '.0f')} ({r.get('method', '?')}): {err}\n")
    return "".join(out)
