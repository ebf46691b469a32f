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
import re
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
    SQLite file), or None when ``exc`` is something else (a bug: let it show its traceback).

    The chain of causes is searched too: Optuna wraps SQLAlchemy errors (``StorageInternalError``),
    which wrap sqlite3's, which say "database or disk is full"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _one_error(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _one_error(exc: BaseException) -> AutopruneError | None:
    if isinstance(exc, AutopruneError):
        return exc
    if isinstance(exc, OSError):
        return os_error(exc.filename or "a file", exc, "use")
    import sqlite3

    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps sqlite3 errors
    if isinstance(exc, sqlite3.Error) or (type(exc).__module__.startswith("sqlalchemy") and orig is not None):
        text = " ".join(str(orig if orig is not None else exc).split())
        if "full" in text:
            return FileWriteError(f"the study storage (study.db) failed: {text}; free some space", errno.ENOSPC)
        if "readonly" in text or "read-only" in text:
            return FileWriteError(f"the study storage (study.db) failed: {text}; make the results folder "
                                  "writable", errno.EROFS)
        return AutopruneError(f"the study storage (study.db) failed: {text}; check that the results folder is "
                              "writable and not damaged")
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in str(exc) or "file write failed" in str(exc)
                                          or "unexpected pos" in str(exc)):
        return FileWriteError(f"could not write a checkpoint: {' '.join(str(exc).split())[:200]}; free some space "
                              "or choose a writable --out", errno.ENOSPC)
    if isinstance(exc, MemoryError):
        return AutopruneError("out of memory; lower the batch size or the model/image size, or use fewer "
                              "--workers")
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


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically and durably (flushed to the disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, serialised in memory first: torch's native file writer
    turns a full disk into "unexpected pos" RuntimeErrors (or aborts), the OS error is one line here."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())




def clean_temps(folder: str | os.PathLike, subdirs: tuple[str, ...] = ()) -> list[Path]:
    """Remove temporary files a killed or failed write left in ``folder`` (and its ``subdirs``): ours
    (``.NAME.HOST.PID.tmp``) unless a live process of this host is writing it, and the older names
    ``NAME.pt.tmp`` / ``.NAME.tmp``. Call it where no other autoprune process writes (under the search's
    run lock). Returns what was removed."""
    removed = []
    mine = re.compile(rf"^\..+\.{re.escape(socket.gethostname())}\.(\d+)\.tmp$")
    for where in (Path(folder), *(Path(folder) / d for d in subdirs)):
        try:
            entries = list(where.iterdir())
        except OSError:
            continue
        for path in entries:
            name = path.name
            if not name.endswith(".tmp") or not path.is_file() or path.is_symlink():
                continue
            found = mine.match(name)
            if found and int(found[1]) != os.getpid() and _alive(int(found[1])):
                continue  # being written right now
            if name.startswith(".") or name.endswith(".pt.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON (non-JSON values as their strings) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, default=str) + "\n")
