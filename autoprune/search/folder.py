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
from typing import TYPE_CHECKING, Any

import torch

from ..data.splits import split_hash_of
from ..errors import AutopruneError
from ..files import os_error

if TYPE_CHECKING:
    from ..data.datasets import Dataset
    from .spec import SearchSpec
    from .store import TrialStore

log = logging.getLogger(__name__)

# Spec keys that may change between a search and its resumption (everything else must match).
RESUMABLE_KEYS = frozenset({"budget", "workers", "device", "source", "early_stop", "screen", "sampler", "seed"})
BASE_KEYS = ("model", "data", "base", "base_epochs", "base_lr")  # what base.pt was made from
STATE_FILES = ("study.db", "trials.csv", "spec.yaml")


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
    try:
        with open(out / "trials.csv", newline="", encoding="utf-8") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0


def study_trials(out: Path, backend: str) -> int:
    """Trials the folder's study storage holds; a missing or unreadable storage next to a non-empty
    trials.csv is refused (resuming would rebuild trials.csv from nothing)."""
    rows = csv_rows(out)
    if backend == "ray":
        from .ray_store import RayStore

        return len(RayStore(out).trials())
    db = out / "study.db"
    if not db.exists():
        if rows:
            raise AutopruneError(f"{db} is missing but trials.csv holds {rows} trials: restore study.db to resume, "
                                 "or start a new --out (trials.csv, models/ and the report are left as they are)")
        return 0
    import optuna
    import sqlalchemy.exc

    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        from optuna.trial import TrialState

        from .optuna_backend import CURVES_SUFFIX

        # the search's own trials: not the `.curves` companion study, not queued retries
        n = sum(1 for s in storage.get_all_studies() if not s.study_name.endswith(CURVES_SUFFIX)
                for t in storage.get_all_trials(s._study_id, deepcopy=False) if t.state != TrialState.WAITING)
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, ValueError) as exc:
        kind = type(getattr(exc, "orig", None) or exc).__name__
        raise AutopruneError(f"{db} is not a readable Optuna study ({kind}); trials.csv ({rows} trials) is "
                             "intact: restore study.db to resume, or start a new --out") from None
    return n


def prepare(spec: SearchSpec, out: Path, resume: bool, backend: str) -> None:
    """Refuse what cannot run in ``out``; clear a search that never started a trial. Caller holds RUN_LOCK."""
    existing = [name for name in STATE_FILES if (out / name).exists()]
    if not existing:
        if resume:
            log.info("nothing to resume in %s: starting a new search", out)
        return
    trials = study_trials(out, backend)
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


def fingerprint(base_path: Path, data: Dataset | None) -> dict[str, str]:
    """Short SHA-256 digests of the base model's weights and of the data split (:mod:`autoprune.data.splits`)."""
    ckpt = torch.load(base_path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for key, value in sorted((ckpt.get("state_dict") or {}).items()):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    out = {"weights": h.hexdigest()[:16]}
    split = None if data is None else split_hash_of(data)
    if split:
        out["split"] = split
    return out


def check_fingerprint(store: TrialStore, current: Mapping[str, str], out: Path) -> None:
    """Record the base's fingerprint in a new study; refuse a study whose trials came from another base."""
    saved = store.meta().get("base_fingerprint")
    n = sum(1 for _ in store.trials())
    if saved is None or n == 0:
        store.set_meta("base_fingerprint", dict(current))
        return
    for key in ("weights", "split"):
        if key in saved and key in current and saved[key] != current[key]:
            what = "weights" if key == "weights" else "data split"
            raise AutopruneError(f"{out / 'base.pt'} differs from the base model this study's {n} trials were pruned "
                                 f"from ({what} {current[key]} vs {saved[key]}); restore the original base.pt "
                                 "(and data), or start a new --out")

