"""The ``autoprune`` command line: parses, calls one library function, prints.

Each module in this package owns a few subcommands and exposes ``register(subparsers)``, which adds
its parsers with ``set_defaults(func=handler)``; ``handler(args) -> int`` returns the exit code.
User errors (:class:`autoprune.errors.AutopruneError`) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import AutopruneError

_MODULES = ("basic", "search", "retrain", "importer")


def common_options(parser: argparse.ArgumentParser) -> None:
    """Options every command accepts."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoprune", description="Search how to prune a CNN: Pareto fronts of accuracy vs MACs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _MODULES:
        importlib.import_module(f"autoprune.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AutopruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
