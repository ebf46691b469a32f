"""What every benchmark shares: options, the machine header, timing, and writing tables.

A benchmark builds one or more :class:`Table` objects and calls :func:`write_tables`, which prints
them and writes ``results/benchmarks/<name>.md`` (machine header, tables, notes) and one CSV per
table (``<name>.csv`` for the first, ``<name>_<key>.csv`` for the others). Timings are medians of
repeats with a fixed thread count, because shared machines are noisy and a mean hides that.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RESULTS_DIR = Path("results") / "benchmarks"


@dataclass(frozen=True)
class Table:
    """Rows of one result table; ``columns`` fixes their order (missing cells print blank)."""

    key: str  # file suffix for the second and later tables of a benchmark ("" for the first)
    title: str
    columns: tuple[str, ...]
    rows: tuple[Mapping[str, Any], ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- options and setup


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a CI-sized run: fewer models, repeats and epochs")
    p.add_argument("--out", default=str(RESULTS_DIR), help=f"output folder (default: {RESULTS_DIR})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: timings comparable on a shared machine; 0 = torch default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return p


def setup(args: argparse.Namespace) -> None:
    """Logging, thread count and seeds from the common options."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("optuna", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_all(args.seed)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_header() -> str:
    """One line naming the machine and software the numbers were measured on."""
    from importlib import metadata

    try:
        tp_version = metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        tp_version = "?"
    parts = [f"{cpu_model()}", f"{os.cpu_count()} cores", f"torch threads {torch.get_num_threads()}",
             f"torch {torch.__version__}", f"torch_pruning {tp_version}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    else:
        parts.append("no GPU")
    try:
        load = os.getloadavg()
        parts.append(f"load avg {load[0]:.1f}")
    except OSError:
        pass
    parts.append(_git_commit())
    parts.append(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    return "Machine: " + ", ".join(parts)


def _git_commit() -> str:
    """The checkout's commit (with '+changes' when the tree differs from it); where there is no git
    repository (a copy of the tree on another machine) the commit in ``$AUTOPRUNE_COMMIT``, else 'no git'."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get("AUTOPRUNE_COMMIT", "").strip()
        return f"commit {given} (copied tree)" if given else "no git"
    return f"commit {head}{'+changes' if dirty else ''}"


# --------------------------------------------------------------------------- timing


def median_seconds(fn: Callable[[], Any], repeats: int = 3, setup_fn: Callable[[], Any] | None = None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs; ``setup_fn`` runs untimed before each
    and its result is passed to ``fn`` when it returns something."""
    times = []
    for _ in range(max(1, repeats)):
        arg = setup_fn() if setup_fn is not None else None
        start = time.perf_counter()
        fn(arg) if setup_fn is not None else fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- formatting and writing


def fmt(value: Any) -> str:
    """Cell text: floats with 4 significant digits (3 decimals for fractions), blanks for None/NaN."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"
    return str(value)


def markdown(table: Table) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    align = "|" + "|".join(":--" if i == 0 else "--:" for i in range(len(table.columns))) + "|"
    lines = [head, align]
    for row in table.rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in table.columns) + " |")
    return "\n".join(lines)


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return value


def write_tables(name: str, tables: Sequence[Table], out_dir: str | Path = RESULTS_DIR, command: str = "",
                 preamble: Sequence[str] = (), echo: bool = True) -> Path:
    """Print ``tables`` (unless ``echo`` is False: e.g. a benchmark saving what it has after each part) and
    write ``<out_dir>/<name>.md`` plus one CSV per table; returns the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Benchmark: {name}", "", machine_header(), ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    parts += [*preamble, ""] if preamble else []
    for table in tables:
        parts += [f"## {table.title}", "", markdown(table), ""]
        parts += [f"- {n}" for n in table.notes]
        if table.notes:
            parts.append("")
        csv_path = out / (f"{name}.csv" if not table.key else f"{name}_{table.key}.csv")
        tmp = csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(table.columns)
            for row in table.rows:
                writer.writerow([_csv_cell(row.get(c)) for c in table.columns])
        tmp.replace(csv_path)
    text = "\n".join(parts).rstrip() + "\n"
    md_path = out / f"{name}.md"
    md_path.write_text(text, encoding="utf-8")
    if echo:
        print(text)  # benchmarks print their table (see the contracts: allowed in these scripts)
    log.info("wrote %s", md_path)
    return md_path


def save_front_plot(fig: Any, ax: Any, path: Path, xlabel: str, title: str, legend_size: int = 8) -> None:
    """Label a front plot's axes (y: val accuracy after fine-tuning), title, grid, legend; save as PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val accuracy after fine-tuning")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, for the .md file (arguments shell-quoted: a config label
    with spaces stays one argument)."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", f"autoprune.benchmarks.{module}", shlex.join(args)]).rstrip()


# ----------------------------------------------------------------------------- the demo spec

DEMO_SPEC = Path(__file__).resolve().parents[2] / "search_spaces" / "digits_demo.yaml"


def demo_raw() -> dict[str, Any]:
    """search_spaces/digits_demo.yaml as parsed YAML: the one source of the demo's search settings."""
    import yaml

    if not DEMO_SPEC.is_file():
        raise SystemExit(f"error: {DEMO_SPEC} not found; the search benchmarks read the demo spec from a source "
                         "checkout of autoprune (git clone, then pip install -e .)")
    return yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8"))


def demo_spec(study: str, model: str, data: Mapping[str, Any], base: str, trials: int, seed: int = 0,
              device: str = "cpu", epochs: int | None = None, batch_size: int | None = None,
              target_low: float | None = None) -> dict[str, Any]:
    """The README demo's spec (search_spaces/digits_demo.yaml) on a given base model with a budget of
    ``trials`` trials (no time budget, so runs are comparable); ``epochs`` etc. override the demo's."""
    raw = demo_raw()
    raw.update({"study": study, "model": model, "data": dict(data), "base": base, "device": device, "seed": seed,
                "budget": {"max_trials": trials}})
    raw.pop("base_epochs", None)
    raw.pop("base_lr", None)
    space = raw["space"]
    if epochs is not None:
        space["epochs"] = epochs
    if batch_size is not None:
        space["batch_size"] = batch_size
    if target_low is not None:
        space["target"] = {**space["target"], "low": target_low}
    return raw
