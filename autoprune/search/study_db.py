"""Reading a results folder's ``study.db`` without changing it, to decide whether it may be resumed.

Optuna's storage creates its tables in any file it opens, so an empty or foreign ``study.db`` would be
silently turned into a new study (and ``trials.csv`` rewritten from it). Before a resume touches
anything, :func:`read_study_db` reads the file with ``sqlite3`` (SELECTs only): its studies, each
study's trial numbers and states, and the study's user attributes (the spec hash and the base
model's fingerprint autoprune records there). A file that is empty, not SQLite, damaged (SQLite's
``quick_check``) or not an Optuna study raises :class:`StudyDbError`, whose message says which.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AutopruneError

HEADER = b"SQLite format 3\x00"
FINISHED = frozenset({"COMPLETE", "PRUNED", "FAIL"})


class StudyDbError(AutopruneError):
    """``study.db`` cannot be what a resume needs (the message says why, without the file name)."""


@dataclass(frozen=True)
class StudyDb:
    """What ``study.db`` holds: study name -> {trial number: Optuna state name}, and study user attrs."""

    trials: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    attrs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def studies(self) -> list[str]:
        return sorted(self.trials)


def read_study_db(path: Path) -> StudyDb:
    """The studies, trials and user attrs of the SQLite file ``path``; ``StudyDbError`` when it is
    empty, not SQLite, damaged or not an Optuna storage. Only reads (a hot journal left by a killed
    writer is rolled back by SQLite itself, as Optuna's own connection would)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(HEADER))
    except OSError as exc:
        raise StudyDbError(f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise StudyDbError("is empty (0 bytes)")
    if head != HEADER:
        raise StudyDbError("is not a SQLite database")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path.resolve()}?mode=rw", uri=True, timeout=60)) as db:
            check = [row[0] for row in db.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise StudyDbError(f"is damaged (SQLite quick_check: {'; '.join(map(str, check))[:120]})")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"studies", "trials", "study_user_attributes"} <= tables:
                raise StudyDbError("is not an Optuna study (no studies/trials tables)")
            names = dict(db.execute("SELECT study_id, study_name FROM studies"))
            trials: dict[str, dict[int, str]] = {name: {} for name in names.values()}
            for study_id, number, state in db.execute("SELECT study_id, number, state FROM trials"):
                if study_id in names and state != "WAITING":
                    trials[names[study_id]][int(number)] = str(state)
            attrs: dict[str, dict[str, Any]] = {name: {} for name in names.values()}
            for study_id, key, value in db.execute("SELECT study_id, key, value_json FROM study_user_attributes"):
                if study_id in names:
                    with contextlib.suppress(ValueError, TypeError):
                        attrs[names[study_id]][str(key)] = json.loads(value)
    except sqlite3.Error as exc:
        raise StudyDbError(f"is damaged or unreadable (SQLite: {' '.join(str(exc).split())[:120]})") from None
    return StudyDb(trials, attrs)
