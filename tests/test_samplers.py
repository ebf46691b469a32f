"""Samplers sized to the budget: NSGA-II's population, TPE's joint (multivariate, grouped) model."""
from __future__ import annotations

import textwrap

import optuna
import pytest

from autoprune.errors import AutopruneError, SpecError
from autoprune.search.samplers import make_sampler, nsga2_population
from autoprune.search.space import suggest
from autoprune.search.spec import load_spec


def spec_file(tmp_path, sampler: str, max_trials: int | None) -> str:
    budget = f"{{max_trials: {max_trials}}}" if max_trials else "{time: 10m}"
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""
        model: small_cnn
        data: digits
        sampler: {sampler}
        budget: {budget}
        """))
    return str(path)


def test_nsga2_population_fits_the_budget():
    assert nsga2_population(8) == 4  # two generations of the smallest population
    assert nsga2_population(30) == 7  # four generations
    assert nsga2_population(1000) == 50  # Optuna's default is the ceiling
    assert nsga2_population(None) == 10  # time budgets
    with pytest.raises(AutopruneError, match="at least 8 trials"):
        nsga2_population(7)
    sampler = make_sampler("nsga2", 0, max_trials=30)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler) and sampler._population_size == 7


def test_a_budget_too_small_for_nsga2_is_refused_at_load(tmp_path):
    with pytest.raises(SpecError, match=r"s\.yaml: sampler: sampler nsga2 needs at least 8 trials.*use sampler: tpe"):
        load_spec(spec_file(tmp_path, "nsga2", 6))
    assert load_spec(spec_file(tmp_path, "nsga2", 20)).sampler == "nsga2"
    assert load_spec(spec_file(tmp_path, "nsga2", None)).sampler == "nsga2"
    with pytest.raises(SpecError, match="override max_trials|needs at least 8"):
        load_spec(spec_file(tmp_path, "nsga2", 20), {"max_trials": 4})


def test_tpe_is_multivariate_and_grouped(tmp_path, recwarn):
    sampler = make_sampler("tpe", 0, workers=2)
    assert sampler._multivariate and sampler._group and sampler._constant_liar
    assert not make_sampler("tpe", 0)._constant_liar
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    # the conditional space samples under the grouped sampler without falling back to errors
    spec = load_spec(spec_file(tmp_path, "tpe", 20))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", 0))
    for i in range(14):
        trial = study.ask()
        params = suggest(trial, spec)
        study.tell(trial, [0.5 + 0.4 * params["target"], params["target"]])
    assert len(study.trials) == 14


def test_the_sampler_asked_for_each_trial_keeps_the_spec_sizing(tmp_path):
    """Both backends re-seed the sampler before every ask; the fresh one must still be sized to the
    spec's budget (NSGA-II population) and workers (TPE constant liar), not to the defaults."""
    from autoprune.search.optuna_backend import trial_sampler

    sampler = trial_sampler(load_spec(spec_file(tmp_path, "nsga2", 30)), 0, 5)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler) and sampler._population_size == 7
    path = tmp_path / "w.yaml"
    path.write_text("model: small_cnn\ndata: digits\nworkers: 2\nbudget: {max_trials: 20}\n")
    assert trial_sampler(load_spec(str(path)), 0, 5)._constant_liar
