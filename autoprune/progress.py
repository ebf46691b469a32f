"""Progress events from the library, rendered by whoever runs it (the CLI, a notebook, a search worker).

Library code never prints: it announces what it is doing through this module, and the reporter that
the caller installed decides how to show it. Two calls cover every long step:

    with progress.phase("LRF feature fit", total=len(groups), unit="group") as p:
        for g in groups:
            ...
            p.advance()

``phase`` nests (a trial's "fine-tune epoch 3/20" inside "trial 7"); ``total`` may be None for a step
without a count. The default reporter only logs the start and end of each phase at DEBUG level, so
nothing appears unless a caller installs a reporter (:func:`use`). The CLI installs a tqdm reporter
on a TTY and a plain line reporter without one (see :mod:`autoprune.cli`).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass
class Phase:
    """One running step: its name, optional count of work units, how many are done, when it began."""

    name: str
    total: int | None = None
    unit: str = "it"
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    parent: Phase | None = None
    postfix: str = ""

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        """Mark ``n`` more units done (and optionally set a short status such as ``loss=0.41``)."""
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        reporter().update(self)

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1


class Reporter(Protocol):
    """Receives phase events; implementations must be cheap (``update`` may be called every step)."""

    def start(self, phase: Phase) -> None: ...

    def update(self, phase: Phase) -> None: ...

    def end(self, phase: Phase) -> None: ...


class LogReporter:
    """The default: start and end of each phase at DEBUG level through :mod:`logging`."""

    def start(self, phase: Phase) -> None:
        logger.debug("%s%s ...", "  " * phase.depth, phase.name)

    def update(self, phase: Phase) -> None:
        pass

    def end(self, phase: Phase) -> None:
        logger.debug("%s%s done in %.1f s", "  " * phase.depth, phase.name, time.monotonic() - phase.started)


_DEFAULT = LogReporter()
_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("autoprune_progress", default=None)
_current: contextvars.ContextVar[Phase | None] = contextvars.ContextVar("autoprune_phase", default=None)


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "it") -> Iterator[Phase]:
    """Announce a step; yields a :class:`Phase` whose ``advance`` reports units of work done."""
    p = Phase(name=name, total=total, unit=unit, parent=_current.get())
    token = _current.set(p)
    rep = reporter()
    rep.start(p)
    try:
        yield p
    finally:
        rep.end(p)
        _current.reset(token)


@contextlib.contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Install ``reporter`` for the calling context (thread / task) while the block runs."""
    token = _reporter.set(reporter)
    try:
        yield reporter
    finally:
        _reporter.reset(token)


def reporter() -> Reporter:
    """The reporter installed for this context (the logging default when none was)."""
    return _reporter.get() or _DEFAULT


def installed() -> Reporter | None:
    """The reporter a caller installed for this context, or None (the logging default is in use)."""
    return _reporter.get()


def current() -> Phase | None:
    """The innermost running phase of this context, or None."""
    return _current.get()
