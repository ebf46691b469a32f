"""Atomic file writes: a results file is either its old self or complete, never half written.

Every file autoprune writes into a results folder goes through :func:`atomic_path`: the data goes to
a temporary name in the same folder, is closed, and is renamed over the target (``os.replace`` is
atomic on POSIX and Windows). On a full disk or a read-only folder the temporary file is removed,
the target is untouched, and the error is an :class:`~autoprune.errors.AutopruneError` naming the
path and the OS error (one line; the CLI exits 2).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import AutopruneError

FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


class FileWriteError(AutopruneError):
    """A file could not be written for a reason no trial can fix (full disk, read-only folder, no permission)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def os_error(path: str | os.PathLike, exc: OSError, doing: str = "write") -> AutopruneError:
    """One line naming the path and the OS error, with what the user can do about it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EROFS: "choose a writable --out",
            errno.EACCES: "choose a folder you may write to", errno.EPERM: "choose a folder you may write to",
            errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(exc.errno or 0, "check the path")
    message = f"cannot {doing} {os.fspath(path)}: {reason}; {hint}"
    return FileWriteError(message, exc.errno) if exc.errno in FATAL_ERRNOS else AutopruneError(message)


def user_error(exc: BaseException) -> AutopruneError | None:
    """A one-line AutopruneError for an environment error a user can fix (disk, permissions, the study's
    SQLite file), or None when ``exc`` is something else (a bug: let it show its traceback)."""
    if isinstance(exc, OSError):
        return os_error(exc.filename or "a file", exc, "use")
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps sqlite3 errors
    if type(exc).__module__.startswith("sqlalchemy") and orig is not None:
        text = " ".join(str(orig).split())
        hint = "free some space" if "full" in text else "check that the results folder is writable and not damaged"
        return AutopruneError(f"the study storage (study.db) failed: {text}; {hint}")
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in str(exc) or "file write failed" in str(exc)):
        return FileWriteError(f"could not write a checkpoint: {' '.join(str(exc).split())[:200]}; free some space "
                              "or choose a writable --out", errno.ENOSPC)
    return None


def one_line_errors(func: Callable[..., int]) -> Callable[..., int]:
    """Decorate a CLI command so that disk and storage errors end it with one line (exit 2), not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return func(*args, **kwargs)
        except AutopruneError:
            raise
        except Exception as exc:
            err = user_error(exc)
            if err is None:
                raise
            raise err from None

    return wrapper


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
