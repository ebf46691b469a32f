"""Subcommands ``search`` (run or resume a search from a spec file) and ``pareto`` (rebuild fronts)."""
from __future__ import annotations

import argparse
import math
import signal
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AutopruneError
from ..files import one_line_errors
from . import apply_threads, common_options, verbose_option


def register(sub: argparse._SubParsersAction) -> None:
    from ..search.backends import BACKENDS
    from ..search.samplers import SAMPLERS

    p = sub.add_parser("search", help="search pruning configurations: a Pareto front of accuracy vs MACs",
                       description="Run (or --resume) the search a spec file describes; results go to "
                                   "--out (default results/<study>). Options given here override the spec; "
                                   "--device and --seed default to the spec's values.")
    p.add_argument("spec", help="search spec (YAML), e.g. search_spaces/digits_demo.yaml")
    p.add_argument("--out", help="results folder (default: results/<study>)")
    p.add_argument("--max-trials", type=int, help="stop starting trials after this many")
    p.add_argument("--time-budget", metavar="T", help="wall-clock budget for this run, e.g. 90s, 30m, 2h, 1h30m")
    p.add_argument("--device-hours", type=float, help="budget in device-hours (summed trial time)")
    p.add_argument("--compute-budget", metavar="T", help="budget in measured trial work of the whole study (CPU "
                   "time, or GPU time on a GPU), e.g. 20m, 2h; the Optuna backend does not start a trial predicted "
                   "not to fit")
    p.add_argument("--resume", action="store_true", help="continue the search in --out (finished trials are kept)")
    p.add_argument("--workers", type=int, help="worker processes on this machine (spread over its GPUs)")
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler (default: the spec's, tpe)")
    p.add_argument("--no-early-stop", action="store_true", help="run every trial to its last epoch")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="optuna",
                   help="optuna: embedded study in OUT/study.db (default); ray: Ray Tune (pip install 'autoprune[ray]')")
    ray = p.add_argument_group("ray backend")
    ray.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: a local Ray in this process)")
    ray.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial holds (default: 1)")
    ray.add_argument("--gpus-per-trial", type=float, help="GPUs each trial holds, e.g. 0.5 to share (default: 1 on CUDA)")
    ray.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the resources fit)")
    common_options(p)
    p.set_defaults(func=cmd_search, device=None, seed=None)

    p = sub.add_parser("pareto", help="rebuild the front table and plots of one or more finished searches",
                       description="With one DIR, rewrite its pareto.csv/png/html and report.md; with several, "
                                   "draw their fronts in one plot under --out.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="results folders of searches")
    p.add_argument("--out", help="where to write (default: the DIR itself, or results/compare for several)")
    verbose_option(p)
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("schema", help="print the JSON Schema of search spec files (for editors)",
                       description="Print the JSON Schema of a search spec. Save it (autoprune schema > "
                                   "spec.schema.json) and start a spec with '# yaml-language-server: "
                                   "$schema=spec.schema.json' for completion and checks in your editor.")
    p.add_argument("--out", help="write it to this file instead of printing it")
    verbose_option(p)
    p.set_defaults(func=cmd_schema)


@one_line_errors
def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from ..search.schema import build_schema

    text = json.dumps(build_schema(), indent=2) + "\n"
    if args.out:
        from ..files import write_text

        write_text(args.out, text)
        print(args.out)
    else:
        print(text, end="")
    return 0


@one_line_errors
def cmd_search(args: argparse.Namespace) -> int:
    from ..search.runner import run_search
    from ..search.spec import load_spec

    overrides = {"max_trials": args.max_trials, "time": args.time_budget, "device_hours": args.device_hours,
                 "compute": args.compute_budget, "workers": args.workers, "sampler": args.sampler,
                 "device": args.device, "seed": args.seed, "early_stop": False if args.no_early_stop else None}
    spec = load_spec(args.spec, overrides)
    apply_threads(args, int(spec.workers or 1))
    ray_options = _ray_options(args)
    out = Path(args.out) if args.out else Path("results") / spec.study
    from ..search import stop

    stop.clear_stop()
    previous = signal.signal(signal.SIGTERM, stop.interrupt)  # `kill`: stop like Ctrl-C, report included
    try:
        result = run_search(spec, args.out, resume=args.resume, backend=args.backend, progress=not args.no_progress,
                            ray_options=ray_options)  # args.out as given: run_search checks it (e.g. "")
        if stop.stop_requested():  # a SIGTERM whose KeyboardInterrupt Python swallowed
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(f"\ninterrupted: the trials so far and their report are in {out}/ (report.md, pareto.png); "
              f"continue with:\n  {resume_command(args.argv, out)}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    counts = outcome_counts(result.rows)
    _print_summary(result, counts, spec.objectives[1])
    if result.front and spec.objectives[1] in ("macs", "params"):
        print(f"front hypervolume: {_hypervolume(result.out_dir, spec.objectives[1]):.4f} (val acc x "
              f"{spec.objectives[1]} fraction of the base, reference point (0, 1); 1 is the unreachable ideal)")
    ran = sum(counts.values()) - counts.get("interrupted", 0) - counts.get("not_started", 0)
    if counts.get("failed") and counts["failed"] == ran:
        error, times = Counter(str(r.get("error") or "?") for r in result.rows if _outcome(r) == "failed").most_common(1)[0]
        raise AutopruneError(f"all {counts['failed']} trials failed; most common error ({times}x): {error}")
    if not counts.get("complete"):
        why = _REASONS.get(result.stop_reason, result.stop_reason)
        more = ("--compute-budget", f"{math.ceil(2 * spec.budget.compute_s)}s") if result.stop_reason == "compute" \
            and spec.budget.compute_s else ("--time-budget", "10m")
        print(f"error: the search ended with no complete trial ({why}), so there is no front; give it more "
              f"room and continue it: {resume_command(args.argv, out, *more)}", file=sys.stderr)
        return 1
    return 0


def _ray_options(args: argparse.Namespace) -> Any:
    """The Ray backend's RayOptions from the flags (None for the Optuna backend, which refuses them)."""
    if args.backend == "ray":
        from ..search.ray_setup import RayOptions

        return RayOptions(address=args.address, cpus_per_trial=args.cpus_per_trial,
                          gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent)
    if args.address or args.gpus_per_trial is not None or args.max_concurrent or args.cpus_per_trial != 1.0:
        raise AutopruneError("--address, --cpus-per-trial, --gpus-per-trial and --max-concurrent need --backend ray")
    return None


def _print_summary(result: Any, counts: Mapping[str, int], objective: str) -> None:
    """The trial counts, why the search stopped, the front and the files written."""
    summary = ", ".join(f"{counts[s]} {s.replace('_', '-')}" for s in
                        ("complete", "early_stopped", "failed", "interrupted", "running", "not_started")
                        if counts.get(s))
    print(f"study {result.study}: {len(result.rows)} trials ({summary or 'none'}), {result.epochs_run} epochs; "
          f"stopped: {_REASONS.get(result.stop_reason, result.stop_reason)}")
    print_front(result.front, result.base, objective)
    print("files:")
    for path in result.files.values():
        print(f"  {path}")
    for sub in ("models", "plans"):
        if (result.out_dir / sub).is_dir():
            print(f"  {result.out_dir / sub}/ ({sum(1 for _ in (result.out_dir / sub).iterdir())} files)")


def resume_command(argv: Sequence[str], out: Path, *extra: str) -> str:
    """The command line that continues this search: the same arguments plus --resume (and --out)."""
    import shlex

    args = list(argv)
    for option in extra[::2]:  # drop an earlier value of an option given again in extra
        while option in args:
            i = args.index(option)
            del args[i:i + 2]
    if "--resume" not in args:
        args.append("--resume")
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return shlex.join(["autoprune", *args, *extra])


def _hypervolume(out: Path, objective: str) -> float:
    from ..report.pareto import front_hypervolume
    from ..report.tables import load_trials

    return float(front_hypervolume(load_trials([out]), objective))


def _outcome(row: Mapping[str, Any]) -> str:
    """A trials.csv row's state, with interrupted trials (failed, to be run again) apart."""
    if row.get("state") == "failed" and str(row.get("error") or "").startswith("interrupted"):
        return "interrupted"
    from ..report.pareto import not_started

    if not_started(row):  # search/admission.py: ran nothing
        return "not_started"
    return str(row.get("state"))


def outcome_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return dict(Counter(_outcome(r) for r in rows))


_REASONS = {"max_trials": "max trials reached", "time": "time budget spent", "device_hours": "device-hours spent",
            "compute": "compute budget spent (or what is left is predicted to pay for no further trial)",
            "exhausted": "the sampler repeats configurations that already ran", "interrupted": "interrupted"}


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _cell(value: Any, width: int, fmt: str, div: float = 1.0) -> str:
    """``value / div`` formatted to ``width``, or "-" when it is missing (never "nan")."""
    x = _num(value)
    return f"{x / div:{width}{fmt}}" if math.isfinite(x) else f"{'-':>{width}}"


def print_front(front: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None, objective: str = "macs") -> None:
    """The Pareto front as a table (one row per trial, by MACs), with the base model first.

    MACs are printed in the unit report.md and pareto.png use (chosen from the base's MACs); a base
    value that is not known prints as "-".
    """
    from ..report.plots import cost_unit

    if not front:
        print("Pareto front: empty (no feasible complete trial)")
        return
    latency = objective == "latency"
    unit, div = cost_unit((base or {}).get("macs") or max((_num(r.get("macs")) for r in front), default=None))
    head = f"{'trial':>5}  {'method':<8} {'alloc':<8} {'target':>6}  {'val_acc':>7}  {unit + 'MACs':>9}  " \
           f"{'MACs %':>6}  {'params':>9}  {'params %':>8}" + ("  latency ms" if latency else "") + "  model"
    print(f"Pareto front ({len(front)} trials):")
    print(head)
    if base:
        print(f"{'base':>5}  {'-':<8} {'-':<8} {'-':>6}  {_cell(base.get('val_acc'), 7, '.4f')}  "
              f"{_cell(base.get('macs'), 9, '.3f', div)}  {100.0:6.1f}  {_cell(base.get('params'), 9, '.0f')}  "
              f"{100.0:8.1f}" + (f"  {_cell(base.get('latency_ms'), 10, '.3f')}" if latency else ""))
    for r in front:
        print(f"{r.get('number', ''):>5}  {str(r.get('method', ''))[:8]:<8} {str(r.get('allocation', ''))[:8]:<8} "
              f"{_num(r.get('target')):6.3f}  {_num(r.get('val_acc')):7.4f}  {_num(r.get('macs')) / div:9.3f}  "
              f"{100 * _num(r.get('macs_frac')):6.1f}  {int(_num(r.get('params'))):9d}  "
              f"{100 * _num(r.get('params_frac')):8.1f}" + (f"  {_num(r.get('latency_ms')):10.3f}" if latency else "")
              + f"  {r.get('model') if isinstance(r.get('model'), str) else ''}")


@one_line_errors
def cmd_pareto(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..report import tables as report
    from ..report.pareto import front_hypervolume, front_mask
    from ..search.results import TRIALS_CSV, read_rows

    dirs = [Path(d) for d in args.dirs]
    for d in dirs:
        if not (d / TRIALS_CSV).is_file():
            raise AutopruneError(f"{d} has no {TRIALS_CSV}; give results folders written by `autoprune search`")
    objective = _objective(dirs[0])
    if len(dirs) == 1 and (args.out is None or Path(args.out).resolve() == dirs[0].resolve()):
        paths = report.write_report(dirs[0])
        print_front(read_rows(dirs[0] / "pareto.csv"), report.read_base(dirs[0]), objective)
        written = [paths.pareto_csv, paths.pareto_png, paths.pareto_html, paths.report_md]
    else:
        out = Path(args.out) if args.out else Path("results") / "compare"
        out.mkdir(parents=True, exist_ok=True)
        frames: dict[str, pd.DataFrame] = {}
        bases: dict[str, dict] = {}
        for d in dirs:
            df = report.load_trials([d])
            name = str(df["study"].iloc[0]) if len(df) else d.name
            if name in frames:  # two runs of one study (e.g. with and without early stopping)
                name = f"{name} ({d})"
            frames[name] = df.assign(study=name)
            bases[name] = report.read_base(d)
        report.plot_pareto(frames, str(out / "pareto.png"), str(out / "pareto.html"), bases, objective=objective)
        fronts = [df[front_mask(df, objective)] for df in frames.values()]
        pd.concat(fronts, ignore_index=True).to_csv(out / "pareto.csv", index=False)
        for (name, df), front in zip(frames.items(), fronts):
            hv = front_hypervolume(df, objective)
            print(f"{name}: {len(df)} trials, {len(front)} on the front, hypervolume {hv:.4f}")
            print_front(front.sort_values("macs" if "macs" in front else "number").to_dict("records"),
                        bases[name], objective)
        written = [out / "pareto.csv", out / "pareto.png", out / "pareto.html"]
    print("files:")
    for path in written:
        if Path(path).exists():
            print(f"  {path}")
    return 0


def _objective(study_dir: Path) -> str:
    """The second objective recorded in a study's spec.yaml (macs when unknown)."""
    import yaml

    from ..report.pareto import OBJECTIVE_COLUMNS

    try:
        info = yaml.safe_load((study_dir / "spec.yaml").read_text()) or {}
        objectives = info.get("objectives") or ["val_acc", "macs"]
        return objectives[1] if objectives[1] in OBJECTIVE_COLUMNS else "macs"
    except (OSError, yaml.YAMLError, AttributeError, IndexError, TypeError):
        return "macs"
