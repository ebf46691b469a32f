"""Tables of the quality benchmark: per-seed rows -> mean and sd per configuration, and a summary.

Pure functions over the rows :mod:`.quality` writes (pandas for the grouping), so the statistics
can be checked without training anything.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from . import common

ACC = ("val acc before FT", "val acc after BN recal", "val acc after FT")
ONE_SHOT = "0+"
SUMMARY_NOTE = ("before FT and after BN recal compare one-shot configurations only (ResRep trains before "
                "surgery). 2 SE: two standard errors of the difference, from the validation sample and the "
                "seed-to-seed sd.")
CONTRAST_NOTE = ("diff = a - b in accuracy points; 2 SE: two standard errors of the difference (validation "
                 "sample and seed-to-seed sd). ResRep's 'before FT' is after its compactor training.")  # "epochs (train+FT)" of a method that trained nothing before surgery


def accuracy_se(acc: float, n: int) -> float:
    """Standard error of one accuracy measured on ``n`` images (binomial): sqrt(p (1 - p) / n)."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else math.nan


def aggregate(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (method, target): mean and sd over seeds of every accuracy; means of the rest."""
    df = pd.DataFrame([r for r in rows if "error" not in r])
    if df.empty:
        return df
    keys = ["method", "target"]
    num = [c for c in ("MACs frac", "MACs frac (TP counter)", "params frac", "prune s", "FT s", "tp_ratio")
           if c in df]
    g = df.groupby(keys, sort=False)
    out = g[num].mean()
    for col in ACC:
        out[col] = g[col].mean()
        out[col + " sd"] = g[col].std(ddof=1).fillna(0.0)
    out["seeds"] = g["seed"].count()
    out["epochs (train+FT)"] = g["epochs (train+FT)"].first()
    return out.reset_index()


def _fmt_acc(row: Mapping[str, Any], col: str) -> str:
    return f"{row[col]:.4f} ± {row[col + ' sd']:.4f}"


def _se(row: Any, col: str, n_val: int) -> float:
    """Standard error of one configuration's mean accuracy: validation sample + seed-to-seed noise."""
    return math.sqrt(accuracy_se(row[col], n_val) ** 2 + row[col + " sd"] ** 2 / max(1, row["seeds"]))


def summary(agg: pd.DataFrame, n_val: int, targets: Sequence[float]) -> list[dict[str, Any]]:
    """Per target and stage: best autoprune configuration vs best Torch-Pruning one.

    "before FT" and "after BN recal" compare one-shot configurations only (ResRep trained with
    compactors before surgery). The difference is called significant when it exceeds two standard
    errors of a difference: sqrt(se_a^2 + se_b^2) with se^2 = p (1 - p) / n_val (the validation
    sample) + sd^2 / seeds (the training noise).
    """
    out = []
    for t in targets:
        at = agg[agg["target"] == t]
        for col in ACC:
            pool = at if col == "val acc after FT" else at[at["epochs (train+FT)"].str.startswith(ONE_SHOT)]
            ours, theirs = pool[pool["method"].str.startswith("autoprune")], pool[pool["method"].str.startswith("tp ")]
            if ours.empty or theirs.empty:
                continue
            a, p = ours.loc[ours[col].idxmax()], theirs.loc[theirs[col].idxmax()]

            out.append({"target": t, "stage": col.removeprefix("val acc "),
                        "autoprune best": f"{_fmt_acc(a, col)} ({a['method'].removeprefix('autoprune ')})",
                        "TP best": f"{_fmt_acc(p, col)} ({p['method'].removeprefix('tp ')})",
                        **_verdict(a, p, col, n_val)})
    return out


def _verdict(a: Any, b: Any, col: str, n_val: int) -> dict[str, Any]:
    diff, se_diff = a[col] - b[col], math.hypot(_se(a, col, n_val), _se(b, col, n_val))
    return {"diff (points)": float(100 * diff), "2 SE (points)": float(200 * se_diff),
            "beyond 2 SE": "yes" if abs(diff) > 2 * se_diff else "no"}


def contrasts(agg: pd.DataFrame, n_val: int, targets: Sequence[float],
              pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each (a, b) pair of configurations, target and stage: a - b with the two-standard-error verdict."""
    out = []
    for a_label, b_label in pairs:
        for t in targets:
            at = agg[agg["target"] == t].set_index("method")
            if a_label not in at.index or b_label not in at.index:
                continue
            a, b = at.loc[a_label], at.loc[b_label]
            for col in ACC:
                out.append({"a": a_label.removeprefix("autoprune "), "b": b_label.removeprefix("autoprune "),
                            "target": t, "stage": col.removeprefix("val acc "), "a acc": _fmt_acc(a, col),
                            "b acc": _fmt_acc(b, col), **_verdict(a, b, col, n_val)})
    return out


def tables(name: str, b: Any, rows: Sequence[Mapping[str, Any]], targets: Sequence[float],
           seeds: Sequence[int], first: bool, pairs: Sequence[tuple[str, str]] = (),
           key_prefix: str = "") -> list[common.Table]:
    """The per-configuration table, the summary (or the contrasts of ``pairs``) and the per-seed rows.

    ``key_prefix`` starts the CSV file suffix of the second and later tables (the case's name when
    several cases share one output file).
    """
    c = b.case
    n_val, n_ft = len(b.data.val), len(b.data.train)
    agg = aggregate(rows)
    shown = []
    for _, r in agg.iterrows():
        d = {k: r[k] for k in ("method", "target", "MACs frac", "MACs frac (TP counter)", "params frac",
                               "epochs (train+FT)", "prune s", "FT s") if k in r}
        d.update({col: _fmt_acc(r, col) for col in ACC})
        if "tp_ratio" in r and not pd.isna(r["tp_ratio"]):
            d["tp_ratio"] = r["tp_ratio"]
        shown.append(d)
    base = b.base
    se = accuracy_se(base["val_acc"], n_val)
    errors = [r for r in rows if "error" in r]
    head = (f"Base: {c.model} trained {base['epochs']} epochs on {base['train_images']} training images "
            f"(lr {c.base_lr}, batch {c.base_batch_size}, cosine, no augmentation): val acc {base['val_acc']:.4f}, "
            f"test acc {base.get('test_acc', float('nan')):.4f} (test read once, for this line only), "
            f"{base['macs'] / 1e6:.2f} M MACs per sample.")
    notes = (
        head,
        (f"Every pruned model: BN recalibration on {b.recal_batches} batches of 64 training images (no gradient), "
         f"then {c.epochs} epochs in all at lr {c.lr}, batch {c.batch_size}, cosine, on a fixed subset of {n_ft} "
         f"training images (seeded); ResRep spends its share of the epochs training compactors before surgery. "
         f"Seeds {', '.join(map(str, seeds))}: mean ± sd."),
        (f"Validation split: {n_val} images. Standard error of one accuracy on it: {100 * se:.2f} points at the "
         f"base's accuracy (sqrt(p(1-p)/n)); at 50 % it is {100 * accuracy_se(0.5, n_val):.2f} points. "
         "Differences under about two of these are noise."),
        ("MACs frac: conv + linear MACs for one sample over the base's (every row is at most its target). "
         "MACs frac (TP counter): the same by tp.utils.count_ops_and_params, which also counts BN, "
         "activations and pooling. tp_ratio: Torch-Pruning's channel ratio, bisected (11 steps) to the target."),
        "prune s: pruning (TP: the whole bisection; ResRep: its compactor training) plus BN recalibration.",
        *( [f"{len(errors)} configuration(s) failed: " + "; ".join(
            f"{e['method']} @ {e['target']} seed {e['seed']}: {e['error']}" for e in errors[:5])] if errors else []),
    )
    title = f"{name}: {c.model}, {len(seeds)} seeds, {n_val} val images, fine-tune subset {n_ft}"
    cols = ("method", "target", "MACs frac", "MACs frac (TP counter)", "params frac", *ACC, "epochs (train+FT)",
            "prune s", "FT s", "tp_ratio")
    verdict = ("diff (points)", "2 SE (points)", "beyond 2 SE")
    if pairs:
        second = common.Table(f"{key_prefix}contrasts", f"{name}: configuration a vs configuration b",
                              ("a", "b", "target", "stage", "a acc", "b acc", *verdict),
                              tuple(contrasts(agg, n_val, targets, pairs)), (CONTRAST_NOTE,))
    else:
        second = common.Table(f"{key_prefix}summary",
                              f"{name}: best of autoprune vs best of Torch-Pruning per target and stage",
                              ("target", "stage", "autoprune best", "TP best", *verdict),
                              tuple(summary(agg, n_val, targets)), (SUMMARY_NOTE,))
    return [
        common.Table("" if first else key_prefix.rstrip("_") or name, title, cols, tuple(shown), notes),
        second,
        common.Table(f"{key_prefix}seeds", f"{name}: every seed", ("method", "target", "seed", *ACC, "MACs frac"),
                     tuple(rows), ()),
    ]
