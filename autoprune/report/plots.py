"""Pareto plots of one or several studies: pareto.png (matplotlib, headless) and pareto.html (plotly).

Split from :mod:`autoprune.report.tables` (which writes the tables and report.md) so plot changes and table
changes do not touch one file. plotly is an optional extra (``pip install autoprune[plot]``) imported
only when an HTML plot is written: without it pareto.html is a short note showing the PNG.
"""
from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..files import atomic_path, write_text
from .pareto import FRACTION_COLUMNS, OBJECTIVE_COLUMNS, _is_true, front_mask

log = logging.getLogger(__name__)

NUMERIC = ("number", "target", "epochs", "lr", "val_acc", "macs", "macs_frac", "params", "params_frac",
           "latency_ms", "epochs_run", "duration_s")
# No grey and no black among method/study colours: faded black means "dominated" in the legend.
METHOD_COLOURS = {"resrep": "#1f77b4", "lrf": "#ff7f0e", "fsm": "#2ca02c", "l1": "#9467bd"}
PALETTE = ("#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1f77b4", "#ff7f0e", "#2ca02c")
UNITS = (("", 1.0), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12))
PLOTLY_JS: bool | str = True  # embed plotly.js so pareto.html works offline ("cdn" for a small file)

def normalise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "state" in df.columns:
        df["state"] = df["state"].fillna("").astype(str)
        if "error" in df.columns:  # tables written before "interrupted" was a state of its own
            old = (df["state"] == "failed") & df["error"].astype(str).str.startswith("interrupted")
            df.loc[old, "state"] = "interrupted"
    if "feasible" in df.columns:
        df["feasible"] = df["feasible"].map(_is_true).astype(bool)
    return df


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


def _axis(objective: str, relative: bool, base_value: float | None, note: str = "") -> tuple[str, str, float]:
    """(column, axis label, divisor) for the cost axis; counts in the unit of the base (:func:`cost_unit`);
    ``note``: how latency was measured (batch, runtime, threads, device)."""
    if objective == "latency":
        where = f"; {note}" if note else ""
        if relative:
            return "latency_frac", f"latency (% of base{where})", 0.01
        return "latency_ms", f"latency (ms{where})", 1.0
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
    note = next((str(b["latency_setting"]) for b in base_points.values() if b.get("latency_setting")), "")
    col, xlabel, div = _axis(objective, relative, max(base_costs, default=None), note)
    colour = _colours(studies if multi else list(all_df.get("method", pd.Series(dtype=str)).dropna().astype(str)))
    groups = []  # (study, df, categories, x, y)
    for study, df in dfs.items():
        df = normalise(df.reset_index(drop=True))
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
        counts["interrupted"] = counts.get("interrupted", 0) + int((cat == "interrupted").sum())
        for c, (marker, filled, alpha, size, _) in STYLES.items():
            counts[c] = counts.get(c, 0) + int(((cat == c) & x.notna()).sum())  # the legend counts drawn points
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
    stopped = f", {counts['interrupted']} interrupted (run again; not drawn)" if counts.get("interrupted") else ""
    ax.set_title(title or f"{names or 'study'}: validation accuracy vs {xlabel.split(' (')[0]} "
                          f"({n_all} trials, {counts.get('front', 0)} on the front{stopped})", fontsize=10)
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
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format="png", bbox_extra_artists=[first, second, ax.title])
    return fig


def _plot_html(groups, colour, multi, base_points, col, div, xlabel, title, out_html, out_png) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError:
        log.warning("plotly is not installed (pip install 'autoprune[plot]'); %s only shows the PNG", out_html)
        rel = os.path.relpath(os.path.abspath(out_png), os.path.dirname(os.path.abspath(out_html)))
        write_text(out_html, f"<!doctype html><html><body><p>Interactive plot needs plotly: "
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
    with atomic_path(out_html) as tmp:
        fig.write_html(tmp, include_plotlyjs=PLOTLY_JS, full_html=True)
