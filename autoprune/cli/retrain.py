"""Subcommands ``retrain`` (pick a trial of a search, fine-tune it longer, report, export) and ``export``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..files import one_line_errors
from . import apply_threads, common_options, verbose_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="pick a trial of a finished search, fine-tune it longer, report val and test",
        description="Choose a trial of the search in DIR (by number, or by a rule on trials.csv "
        "columns: the most accurate complete, feasible trial satisfying it), fine-tune "
        "it with a cosine schedule keeping the best validation epoch, evaluate val and "
        "once the held-out test split, and write model.pt, model.onnx, model.ts, "
        "metrics.json, widths.png and summary.md to --out "
        "(default DIR/retrained/trial_NNNN).",
    )
    p.add_argument(
        "dir", metavar="DIR", help="results folder of a search (holds trials.csv, base.pt, models/)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, metavar="N", help="retrain trial N")
    which.add_argument(
        "--pick",
        metavar="RULE",
        help="e.g. 'macs_frac<=0.4', 'val_acc>=0.95,min=macs', 'params_frac<=50%%'; terms joined "
        "by ',' must all hold; any trials.csv column may be named",
    )
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (default: 30)")
    p.add_argument(
        "--lr", type=float, help="peak learning rate of the cosine schedule (default: the trial's)"
    )
    p.add_argument("--batch-size", type=int, help="batch size (default: the trial's)")
    p.add_argument("--distill", action="store_true", help="also distil from the study's base model")
    p.add_argument(
        "--distill-alpha",
        type=float,
        default=0.7,
        help="weight of the distillation loss with --distill (default: 0.7)",
    )
    p.add_argument("--augment", nargs="?", const="auto", default="none", metavar="LIST",
                   help="augmentation while fine-tuning: none, auto (what suits the data set; no flips for "
                        "digits or MNIST) or a list of crop,flip; --augment alone means auto (default: none)")
    p.add_argument("--out", help="output folder (default: DIR/retrained/trial_NNNN)")
    p.add_argument("--force", action="store_true", help="replace a model already retrained in the output folder")
    p.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "legacy"),
        default="auto",
        help="ONNX exporter (default: auto = torch.export-based, legacy as fallback)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common_options(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "export",
        help="export a saved model (pruned or base) to ONNX or TorchScript",
        description="Rebuild MODEL (an autoprune checkpoint), write it as ONNX or TorchScript with a "
        "dynamic batch dimension and its input recipe (scale, mean, std, layout, size, class names) in "
        "the file's metadata and in OUT.json, and check the file reproduces the PyTorch logits.",
    )
    p.add_argument("model", metavar="MODEL", help="autoprune checkpoint (.pt), e.g. DIR/models/trial_0007.pt")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default: onnx")
    p.add_argument("--out", help="output file (default: MODEL with .onnx / .ts); OUT.json is written beside it")
    p.add_argument("--force", action="store_true", help="overwrite OUT and OUT.json if they exist")
    p.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "legacy", "trace", "script"),
        default="auto",
        help="onnx: dynamo | legacy (auto tries both); torchscript: trace | script (auto = trace)",
    )
    p.add_argument(
        "--atol", type=float, default=1e-4, help="largest allowed |logit difference| (default: 1e-4)"
    )
    verbose_option(p)
    p.set_defaults(func=cmd_export)


@one_line_errors
def cmd_retrain(args: argparse.Namespace) -> int:
    from ..report.retrain import RetrainInterrupted, retrain

    if args.distill_alpha != 0.7 and not args.distill:
        from ..errors import AutopruneError

        raise AutopruneError(f"--distill-alpha {args.distill_alpha:g} applies only with --distill; add --distill "
                             "or drop --distill-alpha")
    apply_threads(args)
    previous = signal.signal(signal.SIGTERM, _sigterm)  # `kill`: stop like Ctrl-C, notes written
    try:
        result = retrain(
            args.dir,
            args.pick,
            trial=args.trial,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            distill=args.distill,
            distill_alpha=args.distill_alpha,
            augment=args.augment,
            out_dir=args.out,
            device=args.device,
            seed=args.seed,
            progress=not args.no_progress,
            onnx_exporter=args.exporter,
            force=args.force,
        )
    except RetrainInterrupted as exc:
        print(
            f"interrupted: best model so far (epoch {exc.best_epoch}, val acc {exc.best_val_acc:.4f}) "
            f"saved in {exc.model_path}; notes in {exc.out_dir / 'metrics.json'}; to retrain again, "
            "re-run with --force (it replaces this model)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    m = result.metrics
    b, p = m["base"], m["pruned"]
    print(f"trial {result.trial}: {result.choice.reason}")
    print(f"{'':8} {'val acc':>8} {'test acc':>9} {'MACs':>14} {'params':>11} {'CPU ms (b1)':>12}")
    for name, d in (("base", b), ("pruned", p)):
        print(
            f"{name:8} {d['val_acc']:8.4f} {d['test_acc']:9.4f} {d['macs']:14,} {d['params']:11,} "
            f"{d['latency_ms']['batch_1']:12.2f}"
        )
    r = m["retrain"]
    print(
        f"MACs fraction {p['macs_frac']:.3f}, params fraction {p['params_frac']:.3f}; "
        f"kept epoch {r['best_epoch']} of {r['epochs_run']}: {r.get('best_reason', '')} "
        f"(val acc in the search {_fmt(r['trial_val_acc'])})"
    )
    for fmt, info in m["exports"].items():
        if "error" in info:
            print(f"warning: {fmt} export failed: {info['error']}", file=sys.stderr)
    names = ", ".join(sorted(f.name for f in result.files.values()))
    print(f"files: {result.out_dir}/ ({names})")
    return 0


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fmt(value: object) -> str:
    try:
        return f"{float(value):.4f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"


@one_line_errors
def cmd_export(args: argparse.Namespace) -> int:
    from ..data.datasets import DataSpec, load_data
    from ..data.preprocess import recipe_for
    from ..engine.plan import load_base
    from ..errors import AutopruneError
    from ..models.registry import ModelSpec
    from ..report.export import default_path, same_weights, sidecar_path
    from ..report.export_check import export_checked

    if not 0 <= args.atol < float("inf"):  # also catches NaN
        raise AutopruneError(f"--atol must be >= 0 and finite (the largest allowed |logit difference|, e.g. "
                             f"1e-4), got {args.atol}")
    exporter = args.exporter
    valid = {"onnx": ("auto", "dynamo", "legacy"), "torchscript": ("auto", "trace", "script")}[args.format]
    if exporter not in valid:
        raise AutopruneError(
            f"--exporter {exporter} does not apply to --format {args.format}; use one of {', '.join(valid)}"
        )
    out = Path(args.out) if args.out else default_path(args.model, args.format)
    if out.is_dir():
        raise AutopruneError(f"--out {out} is a folder; give a file path such as {out / ('model.' + args.format)}")
    existing = [p for p in (out, sidecar_path(out)) if p.exists()]
    model, ckpt = load_base(args.model, "cpu")  # base or pruned: load_base rebuilds either
    if existing and not args.force:
        if not (out.exists() and same_weights(out, model)):  # the same weights (retrain's export): nothing lost
            raise AutopruneError(f"{existing[0]} already exists; pass --force to overwrite it or choose another "
                                 "--out")
        print(f"{out} holds an export of these same weights; writing it again", file=sys.stderr)
    spec = ModelSpec.from_dict(ckpt["model"])
    recipe = recipe_for(load_data(DataSpec.from_dict(ckpt["data"]))) if ckpt.get("data") else None
    if recipe is None:
        print(f"warning: {args.model} records no data set, so the export carries no input recipe",
              file=sys.stderr)
    check = export_checked(
        model,
        (spec.in_channels, spec.image_size, spec.image_size),
        out,
        args.format,
        exporter,
        atol=args.atol,
        recipe=recipe,
    )
    print(out)
    print(
        f"max abs logit difference vs PyTorch: {check.max_abs_diff:.3g} (batches {list(check.batch_sizes)}, "
        f"{check.exporter or args.format} exporter, tolerance {args.atol:g})"
    )
    if recipe is not None:
        print(f"input recipe (in the file's metadata and {sidecar_path(out)}): raw x {recipe.scale:.6g}, then "
              f"(x - mean) / std per channel; {recipe.layout} {recipe.channels}x{recipe.height}x{recipe.width}")
    return 0
