"""The search from Python: ``autoprune.search(spec, out=..., backend=..., sampler=...)`` -> :class:`SearchResult`.

The counterpart of ``autoprune search`` for a notebook or a script::

    import autoprune, optuna
    r = autoprune.search("search_spaces/smoke.yaml", out="results/smoke",
                         sampler=optuna.samplers.RandomSampler(seed=0))
    r.front                 # the Pareto front, a pandas DataFrame (one row per trial, cheapest first)
    r.trials                # every trial (trials.csv)
    r.pick("macs_frac<=0.5")  # the trial a --pick rule selects (a pandas Series)
    r.plot()                # the accuracy-vs-MACs figure (matplotlib), also written to pareto.png
    r.study                 # the Optuna study (study.db)

It writes the same results folder as the CLI (``out``, default ``results/<study>``) and resumes the
same way: calling it again on a folder that holds a search continues that study (``resume=None``, the
default; ``resume=False`` refuses as the CLI does without ``--resume``). :func:`load_search` opens a
finished folder. A spec is a file path, a dict of the file's keys or a
:class:`~autoprune.search.spec.SearchSpec`; ``sampler`` is a name (``tpe``, ``nsga2``, ``random``)
or any Optuna sampler object (used as given for every trial: a resumed search then proposes what
the sampler's own state gives, not what an uninterrupted one would have).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AutopruneError

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from .ray_backend import RayOptions
    from .spec import SearchSpec


@dataclass(frozen=True)
class SearchResult:
    """A search's results folder, read on demand (so it is current while another process resumes it)."""

    folder: Path
    spec: SearchSpec
    stop_reason: str = ""  # max_trials | time | device_hours | interrupted | "" (opened with load_search)
    backend: str = "optuna"
    base: Mapping[str, Any] = field(default_factory=dict)  # base model: val_acc, macs, params

    @property
    def objective(self) -> str:
        """The cost objective: macs, params or latency."""
        return self.spec.objectives[1]

    @property
    def trials(self) -> pd.DataFrame:
        """Every trial (``trials.csv``): state, parameters, val_acc, macs, macs_frac, ..., one row each."""
        from ..report.tables import load_trials

        if not (self.folder / "trials.csv").is_file():
            import pandas as pd

            return pd.DataFrame()
        df = load_trials([self.folder]).drop(columns=["study"])
        return df.sort_values("number", kind="mergesort").reset_index(drop=True)

    @property
    def front(self) -> pd.DataFrame:
        """The Pareto front (complete, feasible trials no other trial beats on both objectives), cheapest
        first."""
        from ..report.pareto import front_mask
        from ..report.tables import OBJECTIVE_COLUMNS

        df = self.trials
        if df.empty:
            return df
        on = df[front_mask(df, self.objective)]
        return on.sort_values(OBJECTIVE_COLUMNS.get(self.objective, "macs"), kind="mergesort").reset_index(drop=True)

    def pick(self, rule: str = "best") -> pd.Series:
        """The trial a rule selects, as ``autoprune retrain --pick`` reads it (``macs_frac<=0.5``,
        ``macs<=0.5M``, ``val_acc>=0.95,min=macs``; see :func:`autoprune.report.pareto.pick`)."""
        from ..report.pareto import pick

        return pick(self.trials, rule)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """The accuracy-vs-cost figure (a matplotlib Figure); written to ``path`` (default the folder's
        ``pareto.png``)."""
        from ..report.plots import plot_pareto

        out = Path(path) if path is not None else self.folder / "pareto.png"
        return plot_pareto({self.spec.study: self.trials}, str(out), None, {self.spec.study: dict(self.base)},
                           objective=self.objective)

    @property
    def study(self) -> optuna.Study:
        """The Optuna study in ``study.db`` (with Ray, the snapshot written for optuna-dashboard)."""
        import optuna

        from .study import storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=self.spec.study, storage=storage(self.folder))

    def retrain(self, rule: str | None = None, trial: int | None = None, **options: Any) -> Any:
        """``autoprune retrain`` on this folder: :func:`autoprune.report.retrain.retrain` (``epochs``,
        ``distill``, ``out_dir``, ...); returns its RetrainResult."""
        from ..report.retrain import retrain

        return retrain(self.folder, rule, trial=trial, **options)

    def __repr__(self) -> str:
        df = self.trials
        n, front = len(df), len(self.front) if len(df) else 0
        why = f", stopped: {self.stop_reason}" if self.stop_reason else ""
        return f"SearchResult({str(self.folder)!r}: {n} trials, {front} on the front{why})"


def load_search(folder: str | os.PathLike) -> SearchResult:
    """A finished (or running) search's results folder as a :class:`SearchResult`."""
    from ..report.tables import read_base
    from .spec import load_spec

    path = Path(folder)
    if not (path / "spec.yaml").is_file():
        raise AutopruneError(f"{path} holds no search (no spec.yaml); give the folder `autoprune search` wrote")
    backend = "ray" if (path / "ray").is_dir() else "optuna"
    return SearchResult(folder=path, spec=load_spec(path / "spec.yaml"), backend=backend, base=read_base(path))


def resolve_spec(spec: str | os.PathLike | Mapping[str, Any] | SearchSpec,
                 overrides: Mapping[str, Any] | None = None) -> SearchSpec:
    """A spec path, dict or SearchSpec, validated, with ``overrides`` (the CLI's option names) applied."""
    from .spec import SearchSpec, load_spec, spec_from_dict

    if isinstance(spec, SearchSpec):
        return spec_from_dict(spec.to_dict(), spec.source, overrides)
    if isinstance(spec, Mapping):
        return spec_from_dict(spec, "<dict>", overrides)
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec, overrides)
    raise AutopruneError(f"spec must be a file path, a dict or a SearchSpec, got {type(spec).__name__}")


def _holds_search(out: Path) -> bool:
    return (out / "trials.csv").is_file() or (out / "study.db").is_file() or (out / "ray").is_dir()


def search(spec: str | os.PathLike | Mapping[str, Any] | SearchSpec, out: str | os.PathLike | None = None, *,
           backend: str = "optuna", sampler: str | optuna.samplers.BaseSampler | None = None,
           resume: bool | None = None, progress: bool | str = True, max_trials: int | None = None,
           time_budget: str | float | None = None, workers: int | None = None, device: str | None = None,
           seed: int | None = None, early_stop: bool | None = None,
           ray_options: RayOptions | None = None, trust_code: str | bool | None = None) -> SearchResult:
    """Run (or resume) a search; returns a :class:`SearchResult` (see the module docstring).

    ``trust_code``: module prefixes (comma-separated, or True for all) whose ``package.module:function``
    model names may be imported, as ``--trust-code`` on the CLI; a spec or folder never grants it.

    ``out``: the results folder (default ``results/<study>``). ``resume``: None continues a search
    ``out`` already holds (else starts one), True / False as ``--resume`` given / not given.
    ``progress``: the live display on stderr (True: bars on a terminal, plain lines otherwise, e.g. in
    a notebook; False: none). ``max_trials``, ``time_budget`` ("30m", seconds), ``workers``,
    ``device``, ``seed``, ``early_stop`` override the spec as the CLI's options do.
    Raises AutopruneError for a bad spec or folder (before any compute); Ctrl-C (KeyboardInterrupt)
    propagates after the report of the trials so far is written (:func:`load_search` opens it).
    """
    from .. import progress as _progress
    from .. import progress_view
    from . import stop
    from .runner import default_out_dir, run_search

    name = sampler if isinstance(sampler, str) else None
    overrides = {"sampler": name, "max_trials": max_trials, "time": time_budget, "workers": workers,
                 "device": device, "seed": seed, "early_stop": early_stop}
    resolved = resolve_spec(spec, overrides)
    folder = Path(out) if out is not None else default_out_dir(resolved)
    if resume is None:
        resume = _holds_search(folder)
    stop.clear_stop()
    show = bool(progress) and _progress.installed() is None  # a caller's own reporter wins
    with progress_view.console() if show else _nothing():
        result = run_search(resolved, folder, resume=bool(resume), backend=backend, progress=progress,
                            ray_options=ray_options, sampler=None if name is not None else sampler,
                            trust_code=trust_code)
    return SearchResult(folder=result.out_dir, spec=resolved, stop_reason=result.stop_reason, backend=backend,
                        base=dict(result.base))


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()
