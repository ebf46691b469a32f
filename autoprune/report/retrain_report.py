"""The human-facing outputs of a retrain: the widths plot (``widths.png``) and ``summary.md``."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..engine.graph import find_groups
from ..engine.plan import Plan
from ..models.registry import ModelSpec, create_model


def plot_widths(path: str | Path, spec: ModelSpec, plan: Plan, title: str = "") -> Path:
    """Bar chart: channels of every channel group of the base model, and how many ``plan`` keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = (spec.in_channels, spec.image_size, spec.image_size)
    groups = sorted(find_groups(create_model(spec).eval(), shape, check=False), key=lambda g: g.depth)
    names = [g.name for g in groups]
    full = [g.channels for g in groups]
    kept = [len(plan.keep[g.name]) if g.name in plan.keep else g.channels for g in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(groups) + 2), 4.5))
    xs = range(len(groups))
    ax.bar(xs, full, color="#d9d9d9", label="base", width=0.8)
    colors = ["#1f77b4" if g.prunable else "#9e9e9e" for g in groups]
    ax.bar(xs, kept, color=colors, label="kept", width=0.55)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(title or "channels kept per group")
    if not all(g.prunable for g in groups):
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(color="#9e9e9e"))
        labels.append("not prunable")
        ax.legend(handles, labels, fontsize=8)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_markdown(m: Mapping[str, Any]) -> str:
    """The short human summary (``summary.md``) of a retrain's metrics."""
    b, p, r = m["base"], m["pruned"], m["retrain"]
    row = m.get("trial_row", {})

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.2f} %"

    def ratio(a: Any, c: Any) -> str:
        return f"{float(a) / float(c):.3f}" if a is not None and c else "-"

    lines = [f"# Retrained trial {m['trial']} of `{m['study']}`", "",
             f"**Chosen:** {m['reason']}.", ""]
    keys = ("method", "target", "allocation", "epochs", "lr")
    what = ", ".join(f"{k}={_short(row[k])}" for k in keys if row.get(k) is not None)
    if what:
        lines += [f"Trial configuration: {what}; val acc in the search {pct(row.get('val_acc'))}.", ""]
    lines += ["| | base | pruned | pruned / base |", "|---|---:|---:|---:|",
              f"| val acc | {pct(b['val_acc'])} | {pct(p['val_acc'])} | |",
              f"| test acc | {pct(b['test_acc'])} | {pct(p['test_acc'])} | |",
              f"| MACs per sample | {b['macs']:,} | {p['macs']:,} | {ratio(p['macs'], b['macs'])} |",
              f"| params | {b['params']:,} | {p['params']:,} | {ratio(p['params'], b['params'])} |"]
    for key in b["latency_ms"]:
        bl, pl = b["latency_ms"][key], p["latency_ms"][key]
        lines.append(f"| CPU latency, {key.replace('_', ' ')} (ms) | {bl:.2f} | {pl:.2f} | {ratio(pl, bl)} |")
    teacher = "no distillation"
    if r["distill"]:
        teacher = f"distilled from the base (alpha {r['distill_alpha']:g})"
    retrained = (f"Retraining: {r['epochs_run']} of {r['epochs']} epochs, cosine schedule from lr "
                 f"{r['lr']:g}, batch {r['batch_size']}, {teacher}; best val epoch {r['best_epoch']} "
                 f"(epoch 0 = the trial's weights, val acc {pct(r['val_acc_start'])}). Test accuracy was "
                 "measured once, after choosing the epoch on val.")
    units = "MACs: multiply-accumulates of convolutions and linear layers for one input (FLOPs = 2 x MACs)."
    files = "Files: `model.pt` (spec + plan + weights; `autoprune.load_pruned`), "
    lines += ["", retrained, "", units, "", files]
    parts = []
    for fmt, info in m.get("exports", {}).items():
        if "error" in info:
            parts.append(f"{fmt}: export failed ({info['error']})")
        else:
            parts.append(f"`{info['path']}` (max |logit diff| vs PyTorch {info['max_abs_diff']:.2g})")
    lines[-1] += ", ".join(parts) + ", `widths.png`, `metrics.json`."
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
