"""Each running trial's phases in a small file, for the search's live display (:mod:`.live`).

Trials run in worker processes (``--workers N``, Ray actors, or the calling process), so their phases
travel through files: :func:`trial_progress` installs a :class:`PhaseFile` reporter for one trial, which
keeps ``<out>/.progress/trial_NNNN.json`` current (its phase stack, counts and elapsed times; rewritten
atomically when a phase starts or ends and every half second while it changes) and removes it when the
trial ends. :func:`read_running` is the reading
side: a file left by a killed worker on this machine is ignored (its process is gone). The files are
advisory: a trial never fails because one cannot be written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import progress
from ..progress import Phase

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
_HOST = socket.gethostname()


# ------------------------------------------------------------------------------ worker side


class PhaseFile:
    """A :class:`~autoprune.progress.Reporter` keeping one trial's phase stack in a JSON file.

    Events only mark the state changed (a step costs nothing); the file is written when a phase starts
    or ends (at most every 0.1 s) and by a flusher thread every ``min_interval`` seconds while
    something changed, so it is never staler than that, even through a long step that reports nothing.
    """

    def __init__(self, path: Path, trial: int, label: str, min_interval: float = 0.5) -> None:
        self.path, self.trial, self.label = Path(path), trial, label
        self.min_interval = min_interval
        self.stack: list[Phase] = []
        self.last = ""  # the phase that ended last (shown between phases)
        self.started = time.time()
        self._written = -math.inf
        self._dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, phase: Phase) -> None:
        self.stack.append(phase)
        self._changed(soon=True)

    def update(self, phase: Phase) -> None:
        self._dirty = True

    def end(self, phase: Phase) -> None:
        if phase in self.stack:
            del self.stack[self.stack.index(phase):]
        self.last = phase.name
        self._changed(soon=True)

    def _changed(self, soon: bool) -> None:
        self._dirty = True
        if soon and time.monotonic() - self._written >= 0.1:
            self.write()

    def doc(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"trial": self.trial, "label": self.label, "pid": os.getpid(), "host": _HOST, "time": time.time(),
                "started": self.started, "last": self.last,
                "phases": [{"name": p.name, "done": p.done, "total": p.total, "unit": p.unit,
                            "elapsed": now - p.started, "postfix": p.postfix} for p in list(self.stack)]}

    def write(self) -> None:
        with self._lock:
            self._dirty = False
            self._written = time.monotonic()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(self.doc()), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError as exc:  # progress is advisory: never fail a trial over it
                log.debug("could not write %s: %s", self.path, exc)

    def open(self) -> PhaseFile:
        self.write()
        self._thread = threading.Thread(target=self._flush, name=f"autoprune-progress-{self.trial}", daemon=True)
        self._thread.start()
        return self

    def _flush(self) -> None:
        while not self._stop.wait(max(0.05, self.min_interval)):
            if self._dirty:
                self.write()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock, contextlib.suppress(OSError):
            self.path.unlink()


def trial_label(hparams: Mapping[str, Any]) -> str:
    """``lrf 0.45 global``: what a trial is, in a few characters."""
    target = hparams.get("target")
    parts = [str(hparams.get("method", "?"))]
    if isinstance(target, (int, float)):
        parts.append(f"{target:.2f}")
    if hparams.get("allocation"):
        parts.append(str(hparams["allocation"]))
    return " ".join(parts)


@contextlib.contextmanager
def trial_progress(out_dir: str | Path, number: int, hparams: Mapping[str, Any]) -> Iterator[PhaseFile]:
    """Report the phases of trial ``number`` (run in this block) to ``<out_dir>/.progress/``."""
    folder = Path(out_dir) / PROGRESS_DIR
    with contextlib.suppress(OSError):
        folder.mkdir(exist_ok=True)
    rep = PhaseFile(folder / f"trial_{number:04d}.json", number, trial_label(hparams)).open()
    try:
        with progress.use(rep):
            yield rep
    finally:
        rep.close()


# ------------------------------------------------------------------------------ parent side


def _alive(doc: Mapping[str, Any]) -> bool:
    if doc.get("host") != _HOST:  # another node (Ray): trust the file
        return True
    try:
        os.kill(int(doc["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError, OSError):
        return True
    return True


def read_running(out_dir: str | Path) -> list[dict[str, Any]]:
    """The progress documents of the trials running now, by trial number (see :class:`PhaseFile`)."""
    folder = Path(out_dir) / PROGRESS_DIR
    docs = []
    try:
        paths = sorted(folder.glob("trial_*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # removed or being replaced: next poll
        if isinstance(doc, dict) and _alive(doc):
            docs.append(doc)
    return sorted(docs, key=lambda d: int(d.get("trial", 0)))


def clear(out_dir: str | Path) -> None:
    """Remove trial progress files left by an earlier run (the caller holds the folder's run lock)."""
    folder = Path(out_dir) / PROGRESS_DIR
    for path in folder.glob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            path.unlink()
