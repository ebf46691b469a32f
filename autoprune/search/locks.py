"""File locks of a results folder (``flock``), so that one search, its workers and a second process agree.

``.run.lock``: held by the search running on the folder (a second one is refused); ``.workers.lock``:
shared by its worker processes (a RUNNING trial found by a search that got both locks belongs to a
dead process); ``.ask.lock``: held while a worker checks the budget and claims its next trial.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-process searches only
    fcntl = None  # type: ignore[assignment]

ASK_LOCK = ".ask.lock"
RUN_LOCK = ".run.lock"
WORKERS_LOCK = ".workers.lock"


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """flock on ``path``; yields False when non-blocking and someone else holds it."""
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
