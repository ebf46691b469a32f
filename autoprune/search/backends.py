"""The search backends as objects: the one place that knows which backends exist and how they differ.

:func:`get_backend` turns a name (``--backend``, ``run_search(backend=...)``) into a
:class:`Backend`; the runner and the results-folder checks call its methods and never test the
name. A backend says what its results folder holds (:meth:`Backend.stored_trials`, refusing a folder
of the other backend in :meth:`Backend.check`), opens its :class:`~autoprune.search.store.TrialStore`,
runs trials until a budget is spent, and finishes the folder (the Ray backend writes ``study.db`` for
optuna-dashboard). Ray is imported only when the Ray backend checks or runs.
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import AutopruneError

if TYPE_CHECKING:
    import torch

    from ..data.datasets import Dataset
    from .ray_setup import RayOptions
    from .spec import SearchSpec
    from .store import Limits, TrialStore

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    """What the runner needs of a backend (see the module docstring)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def check(self, out: Path, options: RayOptions | None = None) -> None:
        """Before any compute: this backend can run here (installed, the folder is not the other's)."""

    @abc.abstractmethod
    def stored_trials(self, out: Path, study: str | None = None) -> int:
        """Trials the folder's study storage holds (of ``study`` where the storage names studies);
        AutopruneError when it is missing or unreadable next to a non-empty trials.csv (resuming would
        rebuild trials.csv from nothing) or holds another search's study."""

    def check_resume(self, spec: SearchSpec, out: Path) -> None:
        """Before a resume changes anything: the folder's storage is this search's, current and intact."""

    @abc.abstractmethod
    def open_store(self, spec: SearchSpec, out: Path, create: bool = False) -> TrialStore:
        """The trial store of the results folder ``out``."""

    @abc.abstractmethod
    def run(self, spec: SearchSpec, out: Path, limits: Limits, device: torch.device, *, workers: int = 1,
            early_stopping: bool = True, on_update: Callable[[list[dict]], None] | None = None,
            data: Dataset | None = None, options: RayOptions | None = None, sampler: Any = None) -> str:
        """Run trials until a budget is spent; why it stopped. The caller holds the folder's run lock.
        ``sampler``: an Optuna sampler object used instead of ``spec.sampler`` (the Python API's)."""

    def finish(self, spec: SearchSpec, out: Path, store: TrialStore) -> None:
        """After a run (also a stopped one): anything the folder needs besides trials.csv and the report."""


class OptunaBackend(Backend):
    """The embedded default: an Optuna study in ``study.db``, ask/tell workers
    (:mod:`autoprune.search.optuna_backend`)."""

    name = "optuna"

    def check(self, out: Path, options: RayOptions | None = None) -> None:
        from .ray_store import RAY_DIR

        if (Path(out) / RAY_DIR).is_dir():  # (a Ray folder has a study.db too: a snapshot for optuna-dashboard)
            raise AutopruneError(f"{out} holds a search run with the ray backend; resume it with --backend ray or "
                                 "choose another --out")

    def stored_trials(self, out: Path, study: str | None = None) -> int:
        from .folder import study_trials

        return study_trials(Path(out), study)

    def check_resume(self, spec: SearchSpec, out: Path) -> None:
        from .folder import check_study_db

        check_study_db(spec, Path(out))  # the Ray backend's study.db is only a snapshot of ray/

    def open_store(self, spec: SearchSpec, out: Path, create: bool = False) -> TrialStore:
        from . import optuna_backend

        return optuna_backend.open_store(spec, out, create=create)

    def run(self, spec: SearchSpec, out: Path, limits: Limits, device: torch.device, *, workers: int = 1,
            early_stopping: bool = True, on_update: Callable[[list[dict]], None] | None = None,
            data: Dataset | None = None, options: RayOptions | None = None, sampler: Any = None) -> str:
        from . import optuna_backend

        return optuna_backend.run(spec, out, limits, device, workers=workers, early_stopping=early_stopping,
                                  on_update=on_update, data=data, sampler=sampler)


class RayBackend(Backend):
    """Ray Tune, local or on a cluster (:mod:`autoprune.search.ray_backend`); trials in ``<out>/ray``."""

    name = "ray"

    def check(self, out: Path, options: RayOptions | None = None) -> None:
        from .ray_setup import check

        check(out, options)  # Ray installed, not an Optuna-backend folder, address answers

    def stored_trials(self, out: Path, study: str | None = None) -> int:
        from .ray_store import RayStore

        return len(RayStore(out).trials())

    def open_store(self, spec: SearchSpec, out: Path, create: bool = False) -> TrialStore:
        from .ray_store import RayStore

        return RayStore(out)

    def run(self, spec: SearchSpec, out: Path, limits: Limits, device: torch.device, *, workers: int = 1,
            early_stopping: bool = True, on_update: Callable[[list[dict]], None] | None = None,
            data: Dataset | None = None, options: RayOptions | None = None, sampler: Any = None) -> str:
        from . import ray_backend  # the spec's workers become max_concurrent (ray_setup.resources)

        return ray_backend.run(spec, out, limits, device, options=options, early_stopping=early_stopping,
                               on_update=on_update, sampler=sampler)

    def finish(self, spec: SearchSpec, out: Path, store: TrialStore) -> None:
        """The Ray run's trials as ``study.db``, for optuna-dashboard (best effort)."""
        from .ray_study_db import write_study_db
        from .study import STORAGE

        try:
            write_study_db(spec, out, store)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a viewer's file must not lose the search's report
            log.warning("could not write %s for optuna-dashboard: %s", Path(out) / STORAGE, exc)


BACKENDS: dict[str, Backend] = {b.name: b for b in (OptunaBackend(), RayBackend())}


def get_backend(name: str | Backend) -> Backend:
    """The backend called ``name`` (a Backend is returned as is); AutopruneError naming the choices."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise AutopruneError(f"unknown search backend {name!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]

