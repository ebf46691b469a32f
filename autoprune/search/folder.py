"""The results folder before a search runs: usable, resumable, and holding the base its trials came from.

Every check here runs before any compute and fails with one line that names the folder and says
what to do: ``--out`` must be a writable folder; an existing search needs ``--resume``; a folder
whose search never started a trial is simply started again; a resumed study whose storage
(``study.db``) is missing or unreadable, or whose spec differs in what makes trials comparable, is
refused (``trials.csv``, ``models/`` and the report are never touched by a refusal); and the base
model's fingerprint (weights and data split) is recorded in the study, so that a resume with a
different ``base.pt`` is refused instead of comparing new trials with old ones.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..data.splits import split_hash_of
from ..errors import AutopruneError
from ..files import os_error
from .results import TRIALS_CSV, count_rows, read_rows
from .study import CURVES_SUFFIX, STORAGE

if TYPE_CHECKING:
    from ..data.datasets import Dataset
    from .spec import SearchSpec
    from .store import TrialStore

log = logging.getLogger(__name__)

# Spec keys that may change between a search and its resumption (everything else must match).
RESUMABLE_KEYS = frozenset({"budget", "workers", "device", "source", "early_stop", "screen", "sampler", "seed"})
BASE_KEYS = ("model", "data", "base", "base_epochs", "base_lr")  # what base.pt was made from
STATE_FILES = (STORAGE, TRIALS_CSV, "spec.yaml")


def check_out(out_dir: str | os.PathLike) -> Path:
    """``--out`` as a folder this process can write (created if needed)."""
    if not os.fspath(out_dir).strip():
        raise AutopruneError("--out is empty; give a results folder, e.g. --out results/my_study")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AutopruneError(f"--out {out} is a file, not a folder; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise os_error(out, exc, "write to") from None
    return out


def csv_rows(out: Path) -> int:
    """Data rows of ``trials.csv`` (0 when missing or unreadable)."""
    return count_rows(out / TRIALS_CSV)


class FolderBackend(Protocol):
    """What :func:`prepare` asks of the backend (:class:`autoprune.search.backends.Backend`)."""

    def stored_trials(self, out: Path, study: str | None = None) -> int: ...

    def check_resume(self, spec: SearchSpec, out: Path) -> None: ...


def study_trials(out: Path, study: str | None = None) -> int:
    """Trials the folder's Optuna study storage holds (of ``study``, or of every study); a missing or
    unreadable storage next to a non-empty trials.csv is refused (resuming would rebuild trials.csv
    from nothing). The Optuna backend's :meth:`~autoprune.search.backends.Backend.stored_trials`."""
    rows = csv_rows(out)
    db = out / STORAGE
    if not db.exists():
        if rows:
            raise AutopruneError(f"{db} is missing but trials.csv holds {rows} trials: restore study.db to resume, "
                                 "or start a new --out (trials.csv, models/ and the report are left as they are)")
        return 0
    from .study_db import StudyDbError, read_study_db

    if rows == 0 and db.stat().st_size == 0:
        return 0  # an empty file and no trials: nothing to lose, the folder is started again
    try:
        info = read_study_db(db)
    except StudyDbError as exc:
        raise AutopruneError(f"{db} {exc}; trials.csv ({rows} trials) is intact: restore study.db to resume, "
                             "or start a new --out") from None
    if study is not None and any(info.trials[name] for name in info.studies() if name not in own_studies(study)):
        foreign = [name for name in info.studies() if name not in own_studies(study)]
        raise AutopruneError(f"{db} holds study {foreign[0]!r}, not {study!r} (the spec's study:): it belongs to "
                             "another search; restore this search's study.db, or start a new --out")
    own = [name for name in info.studies() if name == study or study is None and not name.endswith(CURVES_SUFFIX)]
    return sum(len(info.trials[name]) for name in own)  # never the `.curves` companion study's trials


def own_studies(study: str) -> tuple[str, str]:
    return study, study + CURVES_SUFFIX


def prepare(spec: SearchSpec, out: Path, resume: bool, backend: FolderBackend) -> None:
    """Refuse what cannot run in ``out``; clear a search that never started a trial. Caller holds RUN_LOCK.

    Nothing in ``out`` is changed by a refusal: the study storage is only read (:mod:`.study_db`)."""
    existing = [name for name in STATE_FILES if (out / name).exists()]
    if not existing:
        if resume:
            log.info("nothing to resume in %s: starting a new search", out)
        return
    trials = backend.stored_trials(out, spec.study)
    if trials == 0 and csv_rows(out) == 0:  # it stopped before its first trial (e.g. the base failed)
        saved = _saved_spec(out / "spec.yaml")
        log.warning("%s holds a search that never started a trial; starting it again", out)
        if any(_comparable(saved.get(k)) != _comparable(spec.to_dict().get(k)) for k in BASE_KEYS):
            with contextlib.suppress(OSError):
                (out / "base.pt").unlink()  # made from other settings
        for name in STATE_FILES:
            with contextlib.suppress(OSError):
                (out / name).unlink()
        return
    if not resume:
        raise AutopruneError(f"{out} already holds a search ({trials or csv_rows(out)} trials); pass --resume to "
                             "continue it or choose another --out")
    if (out / "spec.yaml").exists():
        check_resumable(spec, out / "spec.yaml")
    if not (out / "base.pt").exists() and spec.base is None:
        raise AutopruneError(f"{out / 'base.pt'} is missing; this study's trials were pruned from it: restore it, "
                             "set base: in the spec to the same checkpoint, or start a new --out")
    backend.check_resume(spec, out)


def check_study_db(spec: SearchSpec, out: Path) -> None:
    """Before a resume touches anything: ``study.db`` holds this spec's study, every trial trials.csv
    lists (finished where trials.csv says so: not an older copy), the same spec hash, and the
    fingerprint of the ``base.pt`` in the folder."""
    from .study_db import FINISHED, read_study_db

    db = out / STORAGE
    info = read_study_db(db)  # study_trials has refused an unreadable one
    if spec.study not in info.trials:
        raise AutopruneError(f"{db} holds no study {spec.study!r} (it holds {info.studies() or 'none'}); restore "
                             "this search's study.db, or start a new --out")
    held = info.trials[spec.study]
    listed = _csv_states(out)
    missing = sorted(n for n in listed if n not in held)
    unfinished = sorted(n for n, state in listed.items()
                        if state != "running" and n in held and held[n] not in FINISHED)
    if missing or unfinished:
        which = f"trials {missing[:5]} are missing" if missing else f"trials {unfinished[:5]} are not finished"
        raise AutopruneError(f"{db} is older than trials.csv: it holds {len(held)} trials, trials.csv lists "
                             f"{len(listed)} and {which} in study.db; restore the study.db of this search (nothing "
                             "was changed), or start a new --out")
    attrs = info.attrs.get(spec.study, {})
    saved_hash = attrs.get("spec_hash")
    if saved_hash is not None and saved_hash != spec_hash(spec):
        raise AutopruneError(f"{db} was made by a different spec (hash {saved_hash} vs {spec_hash(spec)}): its "
                             "model, data, objectives or space differ; resume with that search's spec or start a new "
                             "--out")
    saved_fp = attrs.get("base_fingerprint")
    if isinstance(saved_fp, Mapping) and held and (out / "base.pt").exists():
        current = base_fingerprint(out / "base.pt")
        for key in ("weights", "split"):
            if key in saved_fp and current.get(key) and saved_fp[key] != current[key]:
                what = "weights" if key == "weights" else "data split"
                raise AutopruneError(f"{out / 'base.pt'} differs from the base model this study's {len(held)} trials "
                                     f"were pruned from ({what} {current[key]} vs {saved_fp[key]}); restore the "
                                     "original base.pt, or start a new --out")


def _csv_states(out: Path) -> dict[int, str]:
    """trials.csv's trial number -> state (rows without a number are skipped)."""
    try:
        rows = read_rows(out / TRIALS_CSV)
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    out_states = {}
    for row in rows:
        with contextlib.suppress(TypeError, ValueError):
            out_states[int(row.get("number") or "")] = str(row.get("state") or "")
    return out_states


def spec_hash(spec: SearchSpec) -> str:
    """A short SHA-256 of what makes a study's trials comparable: every spec key but :data:`RESUMABLE_KEYS`."""
    import json

    kept = {k: v for k, v in _comparable(spec.to_dict()).items() if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _saved_spec(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def check_resumable(spec: SearchSpec, saved_path: Path) -> None:
    """Resuming with a different model, data, objectives or space would mix incomparable trials."""
    saved = _saved_spec(saved_path)
    if not saved:
        raise AutopruneError(f"{saved_path} is empty or not a YAML mapping: the folder's record of the spec this "
                             "search ran is damaged (nothing was changed); restore it, or start a new --out")
    now = _comparable(spec.to_dict())
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_KEYS:
            continue
        if _comparable(saved.get(key)) != now.get(key):
            raise AutopruneError(f"the spec's {key!r} differs from the one this search started with "
                                 f"({saved_path}); resume with the same spec or choose another --out")


def _comparable(value: Any) -> Any:
    """Normalise for comparison (tuples -> lists, nested mappings -> dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the base's fingerprint


def base_fingerprint(base_path: Path) -> dict[str, str]:
    """:func:`fingerprint` of ``base_path`` with the split its checkpoint records (no data loaded)."""
    from ..engine.plan import read_checkpoint

    ckpt = read_checkpoint(base_path)
    out = {"weights": _weights_digest(ckpt)}
    if ckpt.get("split_hash"):
        out["split"] = str(ckpt["split_hash"])
    return out


def _weights_digest(ckpt: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key, value in sorted((ckpt.get("state_dict") or {}).items()):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(base_path: Path, data: Dataset | None) -> dict[str, str]:
    """Short SHA-256 digests of the base model's weights and of the data split (:mod:`autoprune.data.splits`)."""
    from ..engine.plan import read_checkpoint

    out = {"weights": _weights_digest(read_checkpoint(base_path))}
    split = None if data is None else split_hash_of(data)
    if split:
        out["split"] = split
    return out


def check_fingerprint(store: TrialStore, current: Mapping[str, str], out: Path, spec: SearchSpec | None = None
                      ) -> None:
    """Record the base's fingerprint (and ``spec``'s :func:`spec_hash`) in a new study; refuse a study whose
    trials came from another base."""
    meta = store.meta()
    saved = meta.get("base_fingerprint")
    n = sum(1 for _ in store.trials())
    if spec is not None and (n == 0 or "spec_hash" not in meta):
        store.set_meta("spec_hash", spec_hash(spec))
    if saved is None or n == 0:
        store.set_meta("base_fingerprint", dict(current))
        return
    for key in ("weights", "split"):
        if key in saved and key in current and saved[key] != current[key]:
            what = "weights" if key == "weights" else "data split"
            raise AutopruneError(f"{out / 'base.pt'} differs from the base model this study's {n} trials were pruned "
                                 f"from ({what} {current[key]} vs {saved[key]}); restore the original base.pt "
                                 "(and data), or start a new --out")

