"""Subcommands ``models``, ``methods``, ``info``, ``train`` and ``prune``."""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import AutopruneError
from ..models.outputs import OUTPUT_HELP
from . import apply_threads, common_options, seed_type, verbose_option
from .checks import check_training as _check_training
from .checks import float_list as _float_list
from .checks import non_negative as _non_negative
from .latency import check_early, feedback_note, latency_config, latency_options, shown_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model registry")
    verbose_option(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list pruning methods and their parameters (one line each)")
    verbose_option(p)
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("info", help="channel groups, widths, MACs and params of a model")
    p.add_argument("--model", help="registry name, torchvision:<name>, timm:<name> or package.module:function")
    p.add_argument("--data", default="digits", help="data set that fixes input size and classes")
    p.add_argument("--base", help="a checkpoint instead of --model/--data")
    p.add_argument("--all", action="store_true", help="list every group (default: first 40)")
    p.add_argument("--output", metavar="INDEX|KEY", help=OUTPUT_HELP)
    common_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a base model and save it (spec + state_dict + metrics)")
    p.add_argument("--model", required=True, help="registry name (see `autoprune models`), torchvision:<name>, "
                   "timm:<name> or package.module:function")
    p.add_argument("--data", default="digits", help="digits | synthetic | npz:<path> | imagefolder:<dir> | "
                   "cifar10 | cifar100 | mnist | fashionmnist")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, Nesterov, cosine schedule)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per optimizer step")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on conv/linear weights (not BN, biases)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the loss, in [0, 1)")
    p.add_argument("--augment", nargs="?", const="auto", default="none", metavar="LIST",
                   help="training augmentation: none, auto (what suits the data set: crop for digits, "
                        "MNIST, synthetic and npz; crop,flip for CIFAR, Fashion-MNIST, image folders) or a "
                        "list of crop,flip; --augment alone means auto (default: none)")
    p.add_argument("--split-seed", type=seed_type, default=0,
                   help="data seed fixing the train/val/test split, independent of --seed (default: 0)")
    p.add_argument("--out", required=True, help="checkpoint path, e.g. base.pt (base.metrics.json is written "
                   "beside it)")
    p.add_argument("--force", action="store_true", help="overwrite --out and its metrics file if they exist")
    p.add_argument("--output", metavar="INDEX|KEY", help=OUTPUT_HELP)
    common_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prune", help="prune a base model to a MACs or latency target with one method, then "
                       "fine-tune")
    p.add_argument("--base", required=True, help="base checkpoint from `autoprune train`")
    p.add_argument("--method", default="l1", help="l1 | resrep | lrf | fsm (see `autoprune methods`)")
    p.add_argument("--target", type=float, default=0.5, help="MACs (or with --cost latency: latency on this "
                   "device) of the pruned model as a fraction of the base")
    p.add_argument("--cost", default="macs", choices=("macs", "latency"),
                   help="what --target is a fraction of: analytic MACs, or latency measured on this device "
                        "(a latency model is measured once and cached)")
    p.add_argument("--allocation", default="global", help="uniform | global | searched")
    p.add_argument("--multipliers", help="searched allocation: comma-separated per-depth multipliers, e.g. 0.6,1,1.4")
    p.add_argument("--min-ratio", type=float, default=0.05, help="never keep fewer than this fraction of a group")
    p.add_argument("--round-to", default="1", help="keep widths multiples of this (8 suits GPUs), or auto: per "
                   "layer the multiple the latency model finds fastest on this device (needs --cost latency)")
    p.add_argument("--epochs", "--finetune-epochs", dest="epochs", type=int, default=3,
                   help="total epochs: training-time methods (ResRep) use their share (train_share, default all), the rest fine-tunes")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable (e.g. --param penalty=1e-4; see `autoprune methods`)")
    p.add_argument("--out", required=True, help="pruned checkpoint path, e.g. pruned.pt (pruned.metrics.json "
                   "is written beside it)")
    p.add_argument("--force", action="store_true", help="overwrite --out and its metrics file if they exist")
    latency_options(p)
    p.add_argument("--latency-feedback", type=int, default=3, metavar="N",
                   help="with --cost latency: allocations timed on this device to land the measured latency in "
                        "[target - 0.05, target + 0.03] (the aim is re-set by the measured ratio; 0: trust the "
                        "latency model's prediction)")
    common_options(p)
    p.set_defaults(func=cmd_prune)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models.registry import list_models

    for name in list_models():
        print(name)
    print("torchvision:<name>            any torchvision classification model, e.g. torchvision:resnet50")
    print("timm:<name>                   any timm model (pip install 'autoprune[timm]'), e.g. timm:resnet18")
    print("package.module:function       your own: function(num_classes, in_channels, image_size) -> nn.Module")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import get_method, list_methods

    for name in list_methods():
        method = get_method(name)
        print(f"{name:8s} {method.summary}")
        fields = dataclasses.fields(method.Params)
        if not fields:
            print(f"{'':8s} (no parameters)")
        notes = param_help(method.Params)
        width = max((len(f"{f.name}={f.default!r}") for f in fields), default=0)
        for f in fields:
            print(f"{'':8s} {f'{f.name}={f.default!r}':{width}s}  {notes.get(f.name, '')}".rstrip())
        for note in method.notes:
            print(f"{'':8s} note: {note}")
    return 0


def param_help(params_cls: type) -> dict[str, str]:
    """One line per parameter of a method's Params dataclass, from the comments at its field.

    The comment that ends a field's line, or else the comment lines just above the field (joined),
    is the parameter's documentation in the method's source; `autoprune methods` reads it from there
    instead of keeping a second copy that could drift.
    """
    import inspect
    import io
    import tokenize

    try:
        source = inspect.getsource(params_cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(params_cls)}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    fields_at: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
        elif (tok.type == tokenize.NAME and tok.string in names and tok.start[1] == 4
              and tok.start[0] not in fields_at and not tok.line[:4].strip()):
            fields_at[tok.start[0]] = tok.string
    notes: dict[str, str] = {}
    for line, name in fields_at.items():
        text, alone = comments.get(line, ("", True))
        if text and not alone:
            notes[name] = text
            continue
        block, above = [], line - 1
        while above in comments and comments[above][1]:
            block.insert(0, comments[above][0])
            above -= 1
        if block:
            notes[name] = " ".join(block)
    return notes


def _seed(args: argparse.Namespace) -> torch.device:
    from ..train import resolve_device

    apply_threads(args)
    torch.manual_seed(args.seed)
    return resolve_device(args.device)


def _dataset(name: str, seed: int, device: torch.device | str = "cpu") -> Any:
    from ..data.datasets import DataSpec, load_data

    return load_data(DataSpec(name=name, seed=seed), device=device)


def _mega(n: float) -> str:
    return f"{n / 1e6:.3f} M" if n < 1e9 else f"{n / 1e9:.3f} G"


def cmd_info(args: argparse.Namespace) -> int:
    from ..engine.cost import count_macs, count_params
    from ..engine.graph import find_groups
    from ..engine.plan import load_base
    from ..engine.trace import trace_batches
    from ..models.outputs import describe_model
    from ..models.registry import ModelSpec, create_model

    device = _seed(args)
    data = _dataset(args.data, 0) if args.model and not args.base else None  # shape, classes, batches to trace
    if args.base:
        model, ckpt = load_base(args.base)
        spec = ModelSpec.from_dict(ckpt["model"])
    elif args.model:
        spec = ModelSpec(args.model, data.num_classes, data.in_channels, data.image_size, args.output)
        model = create_model(spec)
    else:
        raise AutopruneError("info needs --model NAME (with --data) or --base CHECKPOINT")
    model = model.to(device).eval()
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    groups = find_groups(model, shape, batches=trace_batches(data, device))  # real batches: data-chosen branches
    macs, params = count_macs(model, shape, device), count_params(model)
    print(f"model {spec.name}: input {shape[0]}x{shape[1]}x{shape[2]}, {spec.num_classes} classes")
    print(f"MACs per sample: {_mega(macs)}MACs ({_mega(2 * macs)}FLOPs)   params: {_mega(params)}")
    print(*describe_model(model, shape, device), sep="\n")
    prunable = [g for g in groups if g.prunable]
    print(f"channel groups: {len(groups)} ({len(prunable)} prunable, "
          f"{sum(g.channels for g in prunable)} prunable channels)")
    print(f"{'group (first leader)':44s} {'ch':>5s} {'lead':>4s} {'cons':>4s} {'res':>3s}  prunable")
    shown = groups if args.all else groups[:40]
    for g in shown:
        print(f"{g.name[:44]:44s} {g.channels:5d} {len(g.leaders):4d} {len(g.consumers):4d} "
              f"{'yes' if g.residual else '':>3s}  {'yes' if g.prunable else 'no (see below)'}")
    if len(shown) < len(groups):
        print(f"... {len(groups) - len(shown)} more (--all lists them)")
    for i, g in enumerate(g for g in groups if not g.prunable):  # every reason in full
        print(("unprunable groups, each kept at full width:\n" if i == 0 else "") + f"  {g.name} ({g.channels} channels): {g.reason}")
    return 0


def metrics_path(checkpoint: Path) -> Path:
    """``base.pt`` -> ``base.metrics.json``: one metrics file per checkpoint, so two never collide."""
    return checkpoint.with_name(f"{checkpoint.stem if checkpoint.suffix else checkpoint.name}.metrics.json")


def _refuse_overwrite(out: Path, force: bool) -> None:
    """AutopruneError before any compute when ``out`` or its metrics file exists and ``force`` is off."""
    if out.is_dir():
        raise AutopruneError(f"--out {out} is a folder; give a file path such as {out / 'model.pt'}")
    existing = [p for p in (out, metrics_path(out)) if p.exists()]
    if existing and not force:
        raise AutopruneError(f"{existing[0]} already exists; pass --force to overwrite it or choose another --out")


def _write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    from ..files import write_json

    return write_json(metrics_path(out), metrics, indent=2)


def cmd_train(args: argparse.Namespace) -> int:
    from ..data.datasets import DataSpec, load_data, parse_augmentation
    from ..engine.cost import count_macs, count_params
    from ..engine.plan import save_base
    from ..engine.trace import check_forward
    from ..models.registry import ModelSpec, create_model
    from ..train import TrainConfig, evaluate, fit

    _non_negative(args.epochs, "--epochs")
    _check_training(args)
    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    augment = parse_augmentation(args.augment, args.data)
    device = _seed(args)
    data_spec = DataSpec(name=args.data, seed=args.split_seed)  # --seed moves training, never the split
    data = load_data(data_spec, device=device)
    spec = ModelSpec(args.model, data.num_classes, data.in_channels, data.image_size, args.output)
    model = create_model(spec).to(device)
    check_forward(model, (spec.in_channels, spec.image_size, spec.image_size))  # one line, not a traceback
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                      label_smoothing=args.label_smoothing, augment=augment, seed=args.seed)
    start = time.perf_counter()
    result = fit(model, data.train, data.val, cfg, device, progress=f"train {args.model} on {args.data}")
    seconds = time.perf_counter() - start
    val = evaluate(model, data.val, device)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    metrics = {"val_acc": val["acc"], "val_loss": val["loss"], "epochs": result.epochs_run,
               "train_seconds": round(seconds, 2), "macs": count_macs(model, shape, device),
               "params": count_params(model), "device": str(device), "augment": list(augment),
               "train_config": {**cfg.to_dict(), "augment": list(augment)}}
    save_base(out, model, spec, data, metrics)
    mpath = _write_metrics(out, metrics)
    print(f"val accuracy {100 * val['acc']:.2f}% after {result.epochs_run} epochs in {seconds:.1f} s on {device} "
          f"(augmentation: {', '.join(augment) or 'none'})")
    print(f"MACs per sample {_mega(metrics['macs'])}MACs, params {_mega(metrics['params'])}")
    print(f"saved {out} and {mpath}")
    return 0


def _round_to(text: str) -> int | str:
    """``--round-to``: a positive integer or auto."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise AutopruneError(f"--round-to {text!r} must be a positive integer (1, 8, 16, 32) or auto")
    return n


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    import yaml

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutopruneError(f"--param {pair!r} must look like KEY=VALUE")
        params[key.strip()] = yaml.safe_load(value)  # numbers, booleans and strings as YAML reads them
    return params


def cmd_prune(args: argparse.Namespace) -> int:
    from ..data.datasets import DataSpec, load_data
    from ..engine.allocate import AllocationConfig
    from ..engine.graph import find_groups
    from ..engine.latency import build_latency_model, measure_models
    from ..engine.latency_feedback import LatencyFeedback
    from ..engine.plan import load_base, save_pruned
    from ..engine.pruning import prune
    from ..methods import get_method, make_params
    from ..models.registry import ModelSpec
    from ..progress import phase
    from ..train import TrainConfig, evaluate, fit

    _non_negative(args.epochs, "--epochs")
    if not 0 < args.lr < math.inf:
        raise AutopruneError(f"--lr {args.lr} is invalid; it must be a finite number > 0, e.g. 0.01")
    if not 0 < args.target <= 1:  # also NaN
        raise AutopruneError(f"--target {args.target} is invalid; it is the MACs (or latency) kept as a fraction of "
                             "the base, in (0, 1], e.g. 0.5")
    round_to = _round_to(args.round_to)
    latency = args.cost == "latency"
    if latency:
        check_early(args, [args.latency_batch_size])
        if args.latency_feedback < 0:
            raise AutopruneError(f"--latency-feedback must be 0 (off) or a number of timed allocations, got "
                                 f"{args.latency_feedback}")
    elif round_to == "auto":
        raise AutopruneError("--round-to auto needs --cost latency (the multiples come from this device's latency "
                             "model); with MACs use 1, 8, 16 or 32")
    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    device = _seed(args)
    model, ckpt = load_base(args.base, device)
    if ckpt["format"] != "autoprune.base/1":
        raise AutopruneError(f"{args.base} is already pruned; prune its base model instead")
    if not ckpt.get("data"):
        raise AutopruneError(f"{args.base} does not record its data set; re-save it with `autoprune train`")
    spec = ModelSpec.from_dict(ckpt["model"])
    data_spec = DataSpec.from_dict(ckpt["data"])
    data = load_data(data_spec, device=device)
    multipliers = _float_list(args.multipliers, "--multipliers") if args.multipliers else ()
    allocation = AllocationConfig(mode=args.allocation, multipliers=multipliers, min_ratio=args.min_ratio,
                                  round_to=round_to)
    params = _parse_params(args.param)
    method = get_method(args.method)
    method_epochs = method.training_epochs(make_params(method, params), args.epochs)
    train_cfg = TrainConfig(epochs=method_epochs, lr=args.lr, seed=args.seed)
    base_val = evaluate(model, data.val, device)["acc"]
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    groups = find_groups(model, shape)
    objective = lat_cfg = feedback = None
    if latency:
        lat_cfg = latency_config(args, args.latency_batch_size, device, torch.get_num_threads())
        with shown_progress():
            objective = build_latency_model(model, groups, shape, lat_cfg)
        if args.latency_feedback:
            feedback = LatencyFeedback.timing(model, groups, shape, lat_cfg, args.latency_feedback)
    with phase(f"prune with {args.method} to {args.target:g} of the {'latency' if latency else 'MACs'}"):
        result = prune(model, args.method, args.target, data=data, allocation=allocation, spec=spec,
                       device=device, train_cfg=train_cfg, progress=True, groups=groups, objective=objective,
                       feedback=feedback, **params)
    pruned_val = evaluate(result.model, data.val, device)["acc"]
    ft_epochs = args.epochs - method_epochs
    if ft_epochs > 0:
        fit(result.model, data.train, data.val, TrainConfig(epochs=ft_epochs, lr=args.lr, seed=args.seed), device,
            progress=f"fine-tune {args.method} at {args.target:g} of the {'latency' if latency else 'MACs'}")
    final_val = evaluate(result.model, data.val, device)["acc"]
    metrics = {
        "method": args.method, "target": args.target, "allocation": args.allocation, "params_used": result.info.get(
            "params", {}), "allocation_used": result.info.get("allocation", args.allocation),
        "base_val_acc": base_val, "val_acc_before_finetune": pruned_val, "val_acc": final_val,
        "method_epochs": method_epochs, "finetune_epochs": ft_epochs,
        "base_macs": result.base_macs, "macs": result.macs, "macs_frac": result.macs_fraction,
        "base_params": result.base_params, "params": result.params, "params_frac": result.params_fraction,
        "prune_seconds": round(result.seconds, 2), "info": result.info, "cost": args.cost,
    }
    if latency:
        with shown_progress():
            base_ms, pruned_ms = measure_models([model, result.model], shape, lat_cfg, "latency of base and pruned")
        metrics.update(latency_ms=pruned_ms, base_latency_ms=base_ms, latency_frac=pruned_ms / base_ms,
                       predicted_latency_frac=result.info["predicted_frac"],
                       latency_batch_size=lat_cfg.batch_size, latency_runtime=lat_cfg.runtime,
                       latency_threads=lat_cfg.n_threads, latency_device=objective.info["device_name"],
                       latency_feedback=result.info.get("latency_feedback"))
    save_pruned(out, result.model, spec, result.plan, data_spec, metrics)
    mpath = _write_metrics(out, metrics)
    recal = " + BN recalibration" if result.info.get("bn_recalibration_images") else ""
    when = (f"after {method_epochs} {args.method} training epoch(s){recal}, before fine-tune" if method_epochs
            else f"one-shot{recal}, before fine-tune")
    rows = [("val accuracy", f"{100 * base_val:.2f}%", f"{100 * final_val:.2f}%", f"{100 * pruned_val:.2f}% {when}"),
            ("MACs per sample", f"{_mega(result.base_macs)}MACs", f"{_mega(result.macs)}MACs",
             f"{100 * result.macs_fraction:.1f}% of base" + ("" if latency else f" (target {100 * args.target:.0f}%)")),
            ("params", _mega(result.base_params), _mega(result.params), f"{100 * result.params_fraction:.1f}% of base")]
    if latency:
        note = (f"{100 * metrics['latency_frac']:.1f}% of base measured, {100 * metrics['predicted_latency_frac']:.1f}% "
                f"predicted (target {100 * args.target:.0f}%; {lat_cfg.runtime}, {lat_cfg.n_threads} thread(s)"
                f"{feedback_note(metrics['latency_feedback'])})")
        rows.append((f"latency b{lat_cfg.batch_size} (ms)", f"{metrics['base_latency_ms']:.3f}",
                     f"{metrics['latency_ms']:.3f}", note))
    print(f"{'':16s} {'base':>14s} {'pruned':>14s}")
    for name, before, after, note in rows:
        print(f"{name:16s} {before:>14s} {after:>14s}   {note}")
    print(f"saved {out} and {mpath}")
    return 0

