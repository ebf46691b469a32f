"""The ``autoprune`` command line: parses, calls one library function, prints.

Each module in this package owns a few subcommands and exposes ``register(subparsers)``, which adds
its parsers with ``set_defaults(func=handler)``; ``handler(args) -> int`` returns the exit code.
User errors (:class:`autoprune.errors.AutopruneError`) print one line and exit with code 2.
Every option's help shows its default (:class:`DefaultsFormatter`, set on every subcommand).
Every subcommand takes ``--trust-code PREFIXES``: the only way a model name ``package.module:function``
found in a checkpoint, results folder or spec may import code (:mod:`autoprune.trust`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import AutopruneError
from ..files import user_error
from ..trust import ALL, ENV, granting

_MODULES = ("basic", "search", "retrain", "importer", "latency")
LIBRARY_LOGGER = "autoprune"


def common_options(parser: argparse.ArgumentParser) -> None:
    """Options every computing command accepts (info, train, prune, search, retrain)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when present)")
    parser.add_argument("--seed", type=seed_type, default=0, help="seed of training and sampling; never the data split (see --split-seed / data.seed)")
    parser.add_argument("--threads", default="auto", metavar="N",
                        help="torch CPU threads per process; auto: the cores not busy with other work (load "
                             "average) divided by the worker processes, at least 1")
    verbose_option(parser)


def seed_type(text: str) -> int:
    """argparse type of a seed: an integer in [0, 2**32 - 1] (numpy's and torch's seeds)."""
    from ..limits import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is not a seed in [0, {MAX_SEED}]")
    return value


def verbose_option(parser: argparse.ArgumentParser) -> None:
    """``-v``: autoprune's own debug messages (third-party libraries stay at warnings)."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log autoprune's debug messages (other libraries' stay at warnings)")


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default.

    Unlike :class:`argparse.ArgumentDefaultsHelpFormatter` it skips flags (default False) and
    options without a default (None), where "(default: None)" would say nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default is argparse.SUPPRESS
                or not action.option_strings or isinstance(default, list) and not default):
            return text
        return text + " (default: %(default)s)"


def resolve_threads(value: str | int | None, workers: int = 1) -> int:
    """``--threads``: an integer >= 1, or auto.

    auto: the cores this process may use, less those other processes keep busy (1-minute load
    average), divided by ``workers``; at least 1. Oversubscribing is costly: a 20 s demo search took
    74.6 s with torch's default threads beside another busy process and 29.5 s with one thread.
    """
    if value not in (None, "", "auto"):
        try:
            n = int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise AutopruneError(f"--threads {value!r} must be a positive integer or auto")
        from ..limits import max_threads

        if n > max_threads():
            raise AutopruneError(f"--threads {n} is more than this machine's cores can use (at most {max_threads()}); "
                                 "give fewer or auto")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])  # whole cores other processes keep running
    except (AttributeError, OSError):
        busy = 0
    return max(1, (cores - min(busy, cores - 1)) // max(1, int(workers)))


def apply_threads(args: argparse.Namespace, workers: int = 1) -> int:
    """Set torch's intra-op threads from ``args.threads`` (see :func:`resolve_threads`); returns it."""
    import torch

    n = resolve_threads(getattr(args, "threads", None), workers)
    torch.set_num_threads(n)
    logging.getLogger(LIBRARY_LOGGER).info("torch CPU threads: %d", n)
    return n


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("autoprune")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a source tree via PYTHONPATH)
        from .. import __version__

        return __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: autoprune search: ...; see ... --help``), exit 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        print_error(f"{self.prog}: {message}; see {self.prog} --help")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="autoprune", description="Search how to prune a CNN: Pareto fronts of accuracy vs MACs.",
        formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _MODULES:
        importlib.import_module(f"autoprune.cli.{name}").register(sub)
    for subparser in sub.choices.values():  # argparse reads formatter_class when it formats help
        subparser.formatter_class = DefaultsFormatter
        trust_option(subparser)
    return parser


def trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-code PREFIXES``: modules a ``package.module:function`` model name may import."""
    parser.add_argument("--trust-code", action="append", default=[], metavar="PREFIXES",
                        help="let model names package.module:function import these modules (comma-separated "
                             f"prefixes, repeatable; {ALL}: any module); without it a checkpoint, results folder "
                             f"or spec naming such a model is refused, nothing imported (also: {ENV}=PREFIXES)")


def configure_logging(verbose: bool) -> None:
    """Warnings from everything; with ``verbose`` also autoprune's info and debug messages.

    Third-party libraries (matplotlib, PIL, urllib3, Ray, Optuna) log hundreds of DEBUG lines
    when the root logger is at DEBUG, so only the ``autoprune`` logger is lowered.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.DEBUG if verbose else logging.WARNING)


def print_error(message: object) -> None:
    """``error: <message>`` on one line of stderr, whatever the message holds (newlines are folded; a
    file name that is not valid in the terminal's encoding, e.g. a non-UTF-8 byte, is escaped)."""
    text = "error: " + " ".join(str(message).split()) + "\n"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    sys.stderr.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
    sys.stderr.flush()


def _console(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Progress of the command's phases on stderr (bars on a terminal, plain lines otherwise; none with
    --no-progress), with log records and autoprune's warnings printed as lines that never tear a bar."""
    from .. import progress, progress_view

    quiet = bool(getattr(args, "no_progress", False))
    return progress_view.console(progress.LogReporter() if quiet else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0 as argparse does; a usage error returns 2
        if exc.code == 2:
            return 2
        raise
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for commands that print how to re-run
    configure_logging(bool(getattr(args, "verbose", False)))
    try:
        with granting(getattr(args, "trust_code", None) or None), _console(args):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe raises here, inside the handler below, not at interpreter exit
        return code
    except AutopruneError as exc:
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`autoprune models | head`): stop quietly. Point stdout at devnull so
        # the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
            pass
        return 1
    except Exception as exc:  # disk, permission and storage errors of every command: one line, exit 2
        error = user_error(exc)
        if error is None:  # a bug: show the traceback
            raise
        print_error(error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
