"""Two runs of the quality benchmark compared row by row: did a change move any method's result?

Reads two per-seed CSVs (``quality_<case>_seeds.csv``: method, target, seed, ``val acc after FT``)
and, for every (method, target) in both, reports the mean of each, their difference in points and
one standard error of that difference: the larger of the seed-to-seed one (sample variances over
the seeds, ``var_a / n_a + var_b / n_b``) and the binomial one of a mean of ``n`` accuracies on the
same ``n_val`` validation images (``2 p (1 - p) / (n_val n)``), so a difference is never called real
because three seeds happened to agree.

    python -m autoprune.benchmarks.quality_compare BEFORE_seeds.csv AFTER_seeds.csv --name quality_fashionmnist_engine
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import common

COLUMN = "val acc after FT"


def compare(before: pd.DataFrame, after: pd.DataFrame, n_val: int, column: str = COLUMN) -> list[dict[str, Any]]:
    """One row per (method, target) present in both: means, difference (points), 1 SE, within 1 / 2 SE."""
    rows = []
    for (method, target), b in before.groupby(["method", "target"], sort=False):
        a = after[(after["method"] == method) & (after["target"] == target)]
        if a.empty or b[column].isna().all() or a[column].isna().all():
            continue
        mb, ma = float(b[column].mean()), float(a[column].mean())
        nb, na = int(b[column].count()), int(a[column].count())  # seeds with a number (NaN rows left out)
        var_b = float(b[column].var(ddof=1)) if nb > 1 else 0.0
        var_a = float(a[column].var(ddof=1)) if na > 1 else 0.0
        p = (mb + ma) / 2
        se = max(math.sqrt(var_b / nb + var_a / na), math.sqrt(p * (1 - p) / n_val / nb + p * (1 - p) / n_val / na))
        d = ma - mb
        rows.append({"method": method, "target": float(target), "before": mb, "after": ma,
                     "after - before (points)": f"{100 * d:+.2f}", "1 SE (points)": f"{100 * se:.2f}",
                     "within 1 SE": "yes" if abs(d) <= se else "no", "within 2 SE": "yes" if abs(d) <= 2 * se else "no"})
    return rows


def read_seeds(path: str, column: str = COLUMN) -> pd.DataFrame:
    """A quality benchmark's per-seed CSV with ``column`` as numbers; SystemExit (one line) for anything else."""
    hint = "give the quality benchmark's per-seed CSV (quality_<case>_seeds.csv)"
    if not Path(path).is_file():
        raise SystemExit(f"quality_compare: {path} not found; {hint}")
    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise SystemExit(f"quality_compare: {path} is not a readable CSV ({exc}); {hint}") from None
    missing = [c for c in ("method", "target", column) if c not in frame.columns]
    if missing:
        raise SystemExit(f"quality_compare: {path} has no column {', '.join(map(repr, missing))}; {hint}")
    values = pd.to_numeric(frame[column], errors="coerce")
    if values.isna().all():
        raise SystemExit(f"quality_compare: {path}'s {column!r} holds no numbers (a summary table?); {hint}")
    return frame.assign(**{column: values})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="per-seed CSV of the first run (quality_<case>_seeds.csv)")
    p.add_argument("after", help="per-seed CSV of the second run")
    p.add_argument("--n-val", type=int, default=3000, help="validation images behind each accuracy (default 3000)")
    p.add_argument("--name", default="quality_compare", help="output name under --out")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="output folder (default results/benchmarks)")
    p.add_argument("--note", action="append", default=[], help="a line for the table's notes (what each run was)")
    args = p.parse_args(argv)
    if args.n_val < 1:
        p.error(f"--n-val must be at least 1, got {args.n_val}")
    frames = [read_seeds(path) for path in (args.before, args.after)]
    rows = compare(*frames, n_val=args.n_val)
    n1 = sum(r["within 1 SE"] == "yes" for r in rows)
    n2 = sum(r["within 2 SE"] == "yes" for r in rows)
    notes = (f"before: {args.before}; after: {args.after}.", *args.note,
             ("1 SE: of the difference of the two means, the larger of the seed-to-seed and the binomial "
              f"({args.n_val} validation images) one."),
             f"Within 1 SE: {n1} of {len(rows)} rows; within 2 SE: {n2} of {len(rows)}.")
    table = common.Table("", f"{COLUMN}: before vs after", tuple(rows[0]) if rows else ("method",), tuple(rows), notes)
    common.write_tables(args.name, [table], args.out, common.command_line("quality_compare", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
