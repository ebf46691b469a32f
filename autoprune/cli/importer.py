"""Subcommand ``import``: a model trained elsewhere becomes a base checkpoint (``autoprune.models.importing``)."""
from __future__ import annotations

import argparse

from ..errors import AutopruneError
from ..models.outputs import OUTPUT_HELP
from . import apply_threads, common_options, seed_type


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="turn a trained model (torchvision weights, a state_dict) into a base checkpoint",
        description="Measure a trained model's val accuracy on --data once and save it as a base checkpoint "
                    "that `autoprune prune` and a search spec's `base:` accept.")
    p.add_argument("--model", help="torchvision:<name>, package.module:function or a registry name")
    p.add_argument("--state-dict", help="weights saved with torch.save(model.state_dict(), path)")
    p.add_argument("--weights", help="torchvision pretrained weights, e.g. DEFAULT or IMAGENET1K_V1 (downloads)")
    p.add_argument("--checkpoint", help="an autoprune base checkpoint to re-measure and re-stamp on --data")
    p.add_argument("--allow-split-mismatch", action="store_true",
                   help="with --checkpoint: accept a base made on another split (it never saw --data's images)")
    p.add_argument("--data", default="digits", help="data set the model is measured on and searched with")
    p.add_argument("--split-seed", type=seed_type, default=0, help="data seed fixing the train/val/test split (default: 0)")
    p.add_argument("--image-size", type=int, help="resize images to this size (default: the data set's own)")
    p.add_argument("--out", required=True, help="base checkpoint path, e.g. base.pt")
    p.add_argument("--output", metavar="INDEX|KEY", help=OUTPUT_HELP)
    common_options(p)
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from ..data.datasets import DataSpec
    from ..models.importing import import_model, restamp
    from ..train import resolve_device

    apply_threads(args)
    device = resolve_device(args.device)
    data = DataSpec(name=args.data, seed=args.split_seed, image_size=args.image_size)
    if args.checkpoint:
        if args.model or args.state_dict or args.weights:
            raise AutopruneError("import --checkpoint takes its model from the checkpoint; drop --model, "
                                 "--state-dict and --weights")
        result = restamp(args.checkpoint, data, args.out, allow_split_mismatch=args.allow_split_mismatch,
                         device=device)
    else:
        if not args.model:
            raise AutopruneError("import needs --model NAME with --state-dict PATH or --weights NAME, "
                                 "or --checkpoint PATH")
        if args.state_dict and args.weights:
            raise AutopruneError("give either --state-dict or --weights, not both")
        if args.allow_split_mismatch:
            raise AutopruneError("--allow-split-mismatch applies to --checkpoint only: a new import is "
                                 "stamped with --data's split")
        result = import_model(args.model, data, args.out, state_dict=args.state_dict, weights=args.weights,
                              device=device, output=args.output)
    print(f"{result.spec.name}: val accuracy {100 * result.val_acc:.2f}% on {args.data} "
          f"({result.spec.in_channels}x{result.spec.image_size}x{result.spec.image_size}, "
          f"{result.spec.num_classes} classes), {result.macs / 1e6:.3f} M MACs per sample")
    print(f"saved {result.path} (data split {result.split_hash}); use it as `base:` in a search spec "
          "or with `autoprune prune --base`")
    return 0
