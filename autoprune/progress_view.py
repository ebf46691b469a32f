"""Reporters for :mod:`autoprune.progress`: what a user sees of a long step.

* :class:`BarReporter` (a terminal): one tqdm bar per running phase, nested (``train`` > ``epoch 3/20``
  with a step bar, its rate and ETA); a finished top-level phase leaves its line, inner ones vanish.
* :class:`LineReporter` (no terminal: a cluster job, ``| tee``, a notebook's captured stderr): plain
  lines, never a carriage return: one when a phase has run 2 s (and one when it ends); for the items
  of a counted phase, such as epochs, one when each ends, with its result; and at most one every
  ``interval`` seconds (30) while a phase advances.
* :func:`auto` picks one of them for a stream; :func:`console` installs it for a block and routes
  log records and :class:`~autoprune.errors.AutopruneWarning` through it (``tqdm.write``), so
  messages never tear a bar.

The search shows its trials through :mod:`autoprune.search.live`, which reads the phases the
trial workers write to files.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

from . import progress
from .progress import Phase

LINE_INTERVAL_S = 30.0


def fmt_seconds(s: float | None) -> str:
    """``4.2`` -> ``4.2 s``; ``75`` -> ``1:15``; ``3725`` -> ``1:02:05``; None -> ``?``."""
    if s is None or not math.isfinite(s) or s < 0:
        return "?"
    if s < 10:
        return f"{s:.1f} s"
    s = round(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def eta(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left at the pace so far (None until one unit is done or without a total)."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


def describe(name: str, done: int, total: int | None, unit: str, elapsed: float, postfix: str = "") -> str:
    """``epoch 3/20: 120/400 step (30 %), 0:12, ETA 0:28, loss=0.41`` (one phase, as a line says it)."""
    parts = [name]
    if total:
        parts.append(f": {done}/{total} {unit} ({100 * done / total:.0f} %), {fmt_seconds(elapsed)}, "
                     f"ETA {fmt_seconds(eta(done, total, elapsed))}")
    elif done:
        parts.append(f": {done} {unit}, {fmt_seconds(elapsed)}")
    else:
        parts.append(f": {fmt_seconds(elapsed)}")
    if postfix:
        parts.append(f", {postfix}")
    return "".join(parts)


def _path(p: Phase) -> str:
    names = []
    while p is not None:
        names.append(p.name)
        p = p.parent
    return " > ".join(reversed(names))


class LineReporter:
    """Plain lines (see the module docstring).

    ``interval``: seconds between two progress lines. ``grace``: a phase's start line is printed only
    once it has run this long (a timer), so steps of a fraction of a second print nothing and a
    command that fails at once prints only its error; a phase whose start was printed also prints
    its end. The items of a counted phase (epochs) print one line each when they end.
    """

    def __init__(self, stream: IO[str] | None = None, interval: float = LINE_INTERVAL_S, grace: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.interval = interval
        self.grace = grace
        self.clock = clock
        self._last = clock()
        self._lock = threading.Lock()
        self._said: set[int] = set()  # phases whose start line was printed
        self._timers: dict[int, threading.Timer] = {}

    def write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        with self._lock:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=stream, flush=True)
            self._last = self.clock()

    @staticmethod
    def _item(p: Phase) -> bool:  # one of a counted sequence (an epoch of a 20-epoch fine-tune)
        return p.parent is not None and bool(p.parent.total)

    def _say_start(self, phase: Phase) -> None:
        if id(phase) in self._said:
            return
        for p in _chain(phase):  # an outer phase not yet announced comes first
            if p is not phase and id(p) not in self._said and not self._item(p):
                self._said.add(id(p))
                self.write(f"{_path(p)} ...")
        self._said.add(id(phase))
        self.write(f"{_path(phase)} ...")

    def start(self, phase: Phase) -> None:
        if self._item(phase):
            return
        if self.grace <= 0:
            self._say_start(phase)
            return
        timer = threading.Timer(self.grace, self._say_start, (phase,))
        timer.daemon = True
        self._timers[id(phase)] = timer
        timer.start()

    def update(self, phase: Phase) -> None:
        if self.clock() - self._last >= self.interval:
            p = phase
            self.write(f"{_path(p.parent) + ' > ' if p.parent else ''}"
                       f"{describe(p.name, p.done, p.total, p.unit, time.monotonic() - p.started, p.postfix)}")

    def end(self, phase: Phase) -> None:
        timer = self._timers.pop(id(phase), None)
        if timer is not None:
            timer.cancel()
        took = time.monotonic() - phase.started
        if self._item(phase) and phase.parent is not None and id(phase.parent) not in self._said:
            parent_timer = self._timers.pop(id(phase.parent), None)  # its items' lines stand for its start
            if parent_timer is not None:
                parent_timer.cancel()
            self._said.add(id(phase.parent))
        if self._item(phase) or id(phase) in self._said:
            self._said.discard(id(phase))
            tail = f", {phase.postfix}" if phase.postfix else ""
            self.write(f"{_path(phase)} done in {fmt_seconds(took)}{tail}")


def _chain(p: Phase | None) -> list[Phase]:
    out = []
    while p is not None:
        out.append(p)
        p = p.parent
    return out[::-1]


class BarReporter:
    """Nested tqdm bars on a terminal (see the module docstring)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self._bars: dict[int, Any] = {}

    def start(self, phase: Phase) -> None:
        from tqdm.auto import tqdm

        self._bars[id(phase)] = tqdm(
            total=phase.total, desc=phase.name, unit=phase.unit, leave=phase.depth == 0, file=self.stream,
            dynamic_ncols=True, position=phase.depth, mininterval=0.2,
            bar_format=None if phase.total else "{desc} [{elapsed}{postfix}]")

    def update(self, phase: Phase) -> None:
        bar = self._bars.get(id(phase))
        if bar is None:
            return
        if phase.postfix and phase.postfix != getattr(bar, "_autoprune_postfix", None):
            bar._autoprune_postfix = phase.postfix
            bar.set_postfix_str(phase.postfix, refresh=False)
        bar.update(phase.done - bar.n)

    def end(self, phase: Phase) -> None:
        bar = self._bars.pop(id(phase), None)
        if bar is not None:
            self.update_final(bar, phase)
            bar.close()

    @staticmethod
    def update_final(bar: Any, phase: Phase) -> None:
        if phase.postfix:
            bar.set_postfix_str(phase.postfix, refresh=False)
        if phase.done != bar.n:
            bar.update(phase.done - bar.n)


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def auto(stream: IO[str] | None = None) -> progress.Reporter:
    """Bars on a terminal, plain lines otherwise."""
    return BarReporter(stream) if is_terminal(stream) else LineReporter(stream)


def write(text: str, stream: IO[str] | None = None) -> None:
    """Print ``text`` on its own line without tearing a progress bar (``tqdm.write``)."""
    from tqdm import tqdm

    tqdm.write(text, file=stream or sys.stderr)


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record), self.stream)
        except Exception:  # noqa: BLE001 - as logging.Handler.handleError
            self.handleError(record)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: IO[str] | None = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the CLI: autoprune's warnings as one ``warning: ...`` line."""
    from .errors import AutopruneWarning

    if issubclass(category, AutopruneWarning):
        write(f"warning: {message}", file)
    else:
        write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file)


@contextlib.contextmanager
def console(reporter: progress.Reporter | None = None, stream: IO[str] | None = None) -> Iterator[progress.Reporter]:
    """Install ``reporter`` (default :func:`auto`) for the block; route logging's stream handlers and
    warnings through ``tqdm.write`` while it runs, so a message never tears a bar."""
    rep = reporter or auto(stream)
    root = logging.getLogger()
    swapped = []
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout):
            new = _TqdmHandler(h.stream)
            new.setFormatter(h.formatter)
            new.setLevel(h.level)
            root.removeHandler(h)
            root.addHandler(new)
            swapped.append((h, new))
    shown = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        with progress.use(rep):
            yield rep
    finally:
        warnings.showwarning = shown
        for old, new in swapped:
            root.removeHandler(new)
            root.addHandler(old)
