"""The stop request: a SIGTERM (or a caller) asks the search to stop like Ctrl-C, and both backends poll it.

A signal handler's KeyboardInterrupt alone can be lost: raised inside a finaliser (e.g. SQLAlchemy's
weakref cleanup), Python prints it and carries on. So :func:`interrupt`, the SIGTERM handler the CLI
and the Optuna backend's worker processes install, also records a request here, and every place a
search can stop polls :func:`check`: the Optuna backend's workers at each trial start and at every
training step (pruning and fine-tune: the trial's ``should_stop``), the Ray driver at each step of Tune's loop, and the CLI after ``run_search`` returns.
The request is per process (each worker process has its own).
"""
from __future__ import annotations

from typing import Any

_requested = False


def request_stop() -> None:
    """Ask every search loop of this process to stop as after Ctrl-C, at its next :func:`check`."""
    global _requested
    _requested = True


def stop_requested() -> bool:
    return _requested


def clear_stop() -> None:
    """Forget an earlier request (a new search in the same process starts clean)."""
    global _requested
    _requested = False


def check() -> None:
    """Raise KeyboardInterrupt when a stop was requested (the backends' poll)."""
    if _requested:
        raise KeyboardInterrupt


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl-C (a KeyboardInterrupt now, and a stop request in case Python
    swallows it)."""
    request_stop()
    raise KeyboardInterrupt
