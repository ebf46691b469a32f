"""What a running search shows: the search line and, under it, the phase of every running trial.

The process that started the search runs a :class:`SearchView` thread that polls the trials' phase
files (:mod:`.phase_files`: trials run in worker processes, so their phases travel through small files)
every second and the trial rows the backend reports, and renders them: tqdm bars on a terminal, plain
lines otherwise (a line when a trial starts a new phase or ends, at most one every 30 s per trial while
an epoch runs).
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..progress_view import LINE_INTERVAL_S, describe, fmt_seconds, is_terminal
from ..report.pareto import FRACTION_COLUMNS, not_started
from .phase_files import clear, read_running

if TYPE_CHECKING:
    from .spec import SearchSpec

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the display reads the trials' files


def phase_text(doc: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(``fine-tune > epoch 3/20``, the innermost phase with a count) of a progress document."""
    phases = list(doc.get("phases") or [])
    if not phases:
        return (f"{doc['last']} done" if doc.get("last") else "starting"), None
    counted = next((p for p in reversed(phases) if p.get("total")), None)
    return " > ".join(str(p.get("name")) for p in phases), counted


def trial_line(doc: Mapping[str, Any], now: float | None = None) -> str:
    """``trial 7 (lrf 0.45 global) 1:02: fine-tune > epoch 3/20 (120/400 step (30 %), 0:12, ETA 0:28)``."""
    now = time.time() if now is None else now
    late = max(0.0, now - float(doc.get("time", now)))  # the file was written this long ago
    head = f"trial {doc.get('trial')} ({doc.get('label', '')}) {fmt_seconds(now - float(doc.get('started', now)))}"
    phases = list(doc.get("phases") or [])
    names, counted = phase_text(doc)
    if not phases:
        return f"{head}: {names}"
    if counted is None:
        return f"{head}: {names} ({fmt_seconds(float(phases[-1].get('elapsed', 0.0)) + late)})"
    return f"{head}: {names} ({count_text(counted, late)})"


def count_text(p: Mapping[str, Any], late: float = 0.0) -> str:
    """``120/400 step (30 %), 0:12, ETA 0:28, val_acc 0.93`` of one phase of a progress document."""
    return describe("", int(p.get("done", 0)), p.get("total"), str(p.get("unit", "it")),
                    float(p.get("elapsed", 0.0)) + late, str(p.get("postfix") or "")).lstrip(": ")


def front_points(rows: Sequence[Mapping[str, Any]], objective: str) -> list[tuple[float, float]]:
    """(val_acc, cost) of the front of the complete, feasible rows, cheapest first; cost is the fraction
    of the base (MACs, params or measured latency)."""
    import numpy as np

    from ..report.pareto import pareto_mask

    key = FRACTION_COLUMNS.get(objective, "macs_frac")
    pts = []
    for r in rows:
        feasible = r.get("feasible") is True or str(r.get("feasible")).lower() in ("true", "1")
        if r.get("state") == "complete" and feasible:
            try:
                pts.append((float(r["val_acc"]), float(r[key])))
            except (KeyError, TypeError, ValueError):
                continue
    pts = [p for p in pts if all(math.isfinite(v) for v in p)]
    if not pts:
        return []
    arr = np.asarray(pts, dtype=float)
    on = np.asarray(pareto_mask(arr, [True, False]), dtype=bool)
    return sorted((tuple(map(float, p)) for p in arr[on]), key=lambda p: (p[1], -p[0]))  # type: ignore[misc]


def front_text(points: Sequence[tuple[float, float]], objective: str, most: int = 4) -> str:
    """``front 5 (val acc at MACs of base): 99.4 % at 0.54, 98.9 % at 0.17, ...``."""
    if not points:
        return "front: none yet"
    shown = sorted(points, key=lambda p: -p[0])[:most]
    more = ", ..." if len(points) > most else ""
    what = {"macs": "MACs", "params": "params"}.get(objective, "latency")
    return (f"front {len(points)} (val acc at {what} of base): "
            + ", ".join(f"{100 * a:.1f} % at {c:.2f}" for a, c in shown) + more)


def _read_rows(path: Path) -> list[dict[str, str]]:
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _done(row: Mapping[str, Any]) -> bool:
    return row.get("state") not in ("running", "interrupted") and "interrupted" not in str(row.get("error") or "")


def counted(row: Mapping[str, Any]) -> bool:
    """Whether a trials.csv row counts as a trial done: finished, not interrupted, and started (a trial the
    compute budget could not pay for ran nothing)."""
    return _done(row) and not not_started(row)


class SearchView:
    """The search's live display (module docstring). ``mode``: "bars", "lines" or None (nothing shown);
    :meth:`update` takes the backend's rows (any thread), :meth:`start` / :meth:`close` run the poller."""

    def __init__(self, spec: SearchSpec, out_dir: str | Path | None = None, mode: str | None = "auto",
                 deadline: float | None = None, already_done: int = 0, stream: IO[str] | None = None,
                 poll: float | None = None, interval: float = LINE_INTERVAL_S) -> None:
        if mode == "auto":
            mode = "bars" if is_terminal(stream) else "lines"
        self.mode, self.stream, self.poll, self.interval = mode, stream, POLL_S if poll is None else poll, interval
        self.out = None if out_dir is None else Path(out_dir)
        self.study, self.objective = spec.study, spec.objectives[1]
        self.deadline, self.total = deadline, spec.budget.max_trials
        self.started = time.time()
        self.already_done = already_done  # trials kept from an earlier run do not set this run's pace
        self.rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._trial_bars: dict[int, Any] = {}
        self._said: dict[int, tuple[str, float]] = {}  # trial -> (phase key, when) of its last line
        self._reported: set[int] = set()  # finished trials already announced

    # -- data
    def eta(self, done: int, now: float | None = None) -> float | None:
        """Seconds until the search ends: trials left at the pace of this run, capped by the deadline."""
        now = time.time() if now is None else now
        left = []
        ran = done - self.already_done
        if self.total is not None and ran > 0:
            left.append(max(0.0, (self.total - done) * (now - self.started) / ran))
        if self.deadline is not None:
            left.append(max(0.0, self.deadline - now))
        return min(left) if left else None

    def update(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self.rows = [dict(r) for r in rows]

    def summary(self, running: int, now: float | None = None) -> str:
        """``8/30 done (5 complete, 2 early-stopped, 1 failed), 2 running, ETA 3:10; front 3 (...)``."""
        with self._lock:
            rows = list(self.rows)
        done = [r for r in rows if counted(r)]
        counts = {s: sum(r.get("state") == s for r in done) for s in ("complete", "early_stopped", "failed")}
        parts = ", ".join(f"{n} {s.replace('_', '-')}" for s, n in counts.items() if n)
        total = "" if self.total is None else f"/{self.total}"
        return (f"{len(done)}{total} done{f' ({parts})' if parts else ''}, {running} running, "
                f"ETA {fmt_seconds(self.eta(len(done), now))}; {front_text(front_points(rows, self.objective), self.objective)}")

    # -- thread
    def start(self) -> SearchView:
        if self.out is not None:
            clear(self.out)
            self.update(_read_rows(self.out / "trials.csv"))
            self._reported = {int(r["number"]) for r in self.rows if _done(r) and str(r.get("number", "")).isdigit()}
        if self.mode is None:
            return self
        if self.mode == "bars":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=f"search {self.study}", unit="trial", file=self.stream,
                             dynamic_ncols=True, position=0,
                             bar_format="{desc} [{elapsed}]{postfix}")
        else:
            self._line(f"search {self.study}: started" + (f", {self.already_done} trials kept from an earlier run"
                                                          if self.already_done else ""))
        self._thread = threading.Thread(target=self._loop, name="autoprune-search-view", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.render()
            except Exception as exc:  # a display problem must not stop the search
                log.debug("search display: %s", exc, exc_info=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.mode is not None:
            with contextlib.suppress(Exception):
                self.render(final=True)
        for bar in list(self._trial_bars.values()):
            bar.close()
        self._trial_bars.clear()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- rendering
    def render(self, final: bool = False) -> None:
        running = [] if (self.out is None or final) else read_running(self.out)
        if self.mode == "bars":
            self._render_bars(running)
        elif self.mode == "lines":
            self._render_lines(running, final)

    def _elapsed(self) -> str:
        return fmt_seconds(time.time() - self.started)

    def _line(self, text: str) -> None:
        from ..progress_view import write

        write(f"[{time.strftime('%H:%M:%S')}] {text}", self.stream)

    def _render_lines(self, running: list[dict[str, Any]], final: bool) -> None:
        now = time.time()
        with self._lock:
            rows = list(self.rows)
        for r in rows:  # trials that ended since the last poll
            try:
                number = int(r["number"])
            except (KeyError, TypeError, ValueError):
                continue
            if number in self._reported or not _done(r):
                continue
            self._reported.add(number)
            self._said.pop(number, None)
            self._line(f"trial {number} {finished_text(r, self.objective)} | search {self.study} "
                       f"[{self._elapsed()}]: {self.summary(len(running), now)}")
        for doc in running:
            number = int(doc.get("trial", -1))
            if number in self._reported:
                continue
            phases = doc.get("phases") or []
            key = str(phases[0].get("name")) if phases else phase_text(doc)[0]  # epochs of one fine-tune: one phase
            said = self._said.get(number)
            if said is None or said[0] != key or now - said[1] >= self.interval:
                self._said[number] = (key, now)
                self._line(trial_line(doc, now))

    def _render_bars(self, running: list[dict[str, Any]]) -> None:
        from tqdm.auto import tqdm

        now = time.time()
        with self._lock:
            done = sum(counted(r) for r in self.rows)
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(self.summary(len(running), now), refresh=False)
            self._bar.refresh()
        live = {int(d.get("trial", -1)): d for d in running}
        for number in [n for n in self._trial_bars if n not in live]:
            self._trial_bars.pop(number).close()
        for number, doc in live.items():
            names, counted = phase_text(doc)
            took = fmt_seconds(now - float(doc.get("started", now)))
            desc = f"  trial {number} ({doc.get('label', '')}, {took}) {names}"
            bar = self._trial_bars.get(number)
            if bar is None:
                bar = self._trial_bars[number] = tqdm(total=None, desc=desc, file=self.stream, leave=False,
                                                      dynamic_ncols=True, mininterval=0)
                bar._autoprune_key = None
            key = (names, None if counted is None else counted.get("total"))
            if bar._autoprune_key != key:  # a new phase: restart the count so rate and ETA are its own
                bar._autoprune_key = key
                bar.reset(total=None if counted is None else counted.get("total"))
                bar.unit = str(counted.get("unit", "it")) if counted else "it"
                bar.bar_format = None if counted else "{desc} [{elapsed}]"
            bar.set_description_str(desc, refresh=False)
            if counted is not None:
                bar.update(int(counted.get("done", 0)) - bar.n)
                bar.set_postfix_str(str(counted.get("postfix") or ""), refresh=False)  # never a stale epoch's
            bar.refresh()


def finished_text(row: Mapping[str, Any], objective: str) -> str:
    """``complete: val_acc 0.9721 at 0.45 of the MACs, 12.3 s`` for a trials.csv row."""
    state = str(row.get("state", "?")).replace("_", "-")
    if not_started(row):
        return "not started: its predicted work exceeds what budget.compute has left"
    try:
        acc = f"val_acc {float(row['val_acc']):.4f}"
    except (KeyError, TypeError, ValueError):
        acc = ""
    cost = ""
    key = FRACTION_COLUMNS.get(objective, "macs_frac")
    with contextlib.suppress(KeyError, TypeError, ValueError):
        c = float(row[key])
        if math.isfinite(c):
            what = "MACs" if objective == "macs" else objective
            cost = f" at {c:.2f} of the base's {what}"
    took = ""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        took = f", {float(row['duration_s']):.1f} s"
    error = f" ({str(row.get('error'))[:80]})" if state == "failed" and row.get("error") else ""
    return f"{state}{': ' + acc if acc and acc != 'val_acc nan' else ''}{cost}{took}{error}"
