"""A Ray search's trials as an Optuna study in ``<out>/study.db``, so optuna-dashboard opens it too.

The Ray backend keeps its trials as files under ``<out>/ray`` (:mod:`autoprune.search.ray_store`);
that folder stays the source of truth. After every run (and when a run is stopped) the runner
rewrites ``study.db`` from it: the study ``<study>`` with the objectives named (``set_metric_names``),
each finished trial with its Optuna parameters, distributions, values and constraints, and the
companion study ``<study>.curves`` with the per-epoch validation accuracy, exactly as the Optuna
backend writes them. The study carries the user attr ``backend: ray``; the file is written under a
temporary name and moved into place.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .results import constraint_names
from .study import STORAGE, add_curves, directions, name_metrics

if TYPE_CHECKING:
    from .ray_store import RayStore
    from .spec import SearchSpec

log = logging.getLogger(__name__)


def write_study_db(spec: SearchSpec, out_dir: str | Path, store: RayStore) -> Path:
    """Rewrite ``<out_dir>/study.db`` from the RayStore ``store``; returns its path."""
    import optuna

    from .ray_store import history

    out = Path(out_dir)
    path, tmp = out / STORAGE, out / f".{STORAGE}.tmp"
    tmp.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp.resolve()}")
    study = optuna.create_study(study_name=spec.study, storage=storage, directions=directions(spec))
    name_metrics(study, spec.objectives)
    study.set_user_attr("objectives", list(spec.objectives))
    study.set_user_attr("backend", "ray")
    study.add_trials(history(store, constraint_names(spec)))
    finished = [t for t in store.trials() if t.state in ("complete", "early_stopped", "failed")
                and not t.interrupted]
    add_curves(storage, spec.study, [(t.number, t.state, t.hparams, t.curve, t.record.get("val_acc"), t.cost)
                                     for t in finished])
    storage.engine.dispose()
    tmp.replace(path)
    log.info("wrote %s (%d trials) for optuna-dashboard", path, len(finished))
    return path
