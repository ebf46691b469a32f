"""Atomic file writes: a results file is either its old self or complete, never half written.

Every file autoprune writes into a results folder goes through :func:`atomic_path`: the data goes to
a temporary name in the same folder, is closed, and is renamed over the target (``os.replace`` is
atomic on POSIX and Windows). On a full disk or a read-only folder the temporary file is removed,
the target is untouched, and the error is an :class:`~autoprune.errors.AutopruneError` naming the
path and the OS error (one line; the CLI exits 2).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import AutopruneError


def os_error(path: str | os.PathLike, exc: OSError, doing: str = "write") -> AutopruneError:
    """One line naming the path and the OS error, with what the user can do about it."""
    reason = exc.strerror or str(exc)
    hint = {28: "free some space", 30: "choose a writable --out", 13: "choose a folder you may write to",
            122: "free some space"}.get(exc.errno or 0, "check the path")
    return AutopruneError(f"cannot {doing} {os.fspath(path)}: {reason}; {hint}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON (non-JSON values as their strings) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, default=str) + "\n")
