"""Optuna samplers for a two-objective pruning search, sized to its budget.

- ``tpe`` (default): multi-objective TPE (Ozaki et al., 2022) with ``multivariate=True`` (one joint
  density over the parameters instead of one per parameter: the MACs target and the per-layer shape
  interact) and ``group=True`` (the space is conditional: each method's parameters and the searched
  shape exist only in some trials; ``group`` models each sub-space that occurs together instead of
  falling back to independent sampling). ``constant_liar`` when several workers share the study,
  so they do not all sample the same point.
- ``nsga2``: NSGA-II with its population sized to the budget: Optuna's default population of 50 is
  larger than most search budgets, and a run that never completes its first generation is random
  search. With ``budget.max_trials`` = N the population is ``clamp(N // 4, 4, 50)`` (at least four
  generations); a budget below two generations of the smallest population (8 trials) is refused.
  Without ``max_trials`` (time budgets) the population is 10.
- ``random``: uniform random sampling (the baseline the benchmark compares with).
"""
from __future__ import annotations

import logging
import warnings

import optuna

from ..errors import AutopruneError

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
NSGA2_MIN_POPULATION = 4
NSGA2_MAX_POPULATION = 50  # Optuna's default
NSGA2_GENERATIONS = 4  # generations a max_trials budget is sized for
NSGA2_TIME_POPULATION = 10  # population when only a time or device-hours budget is known


def nsga2_population(max_trials: int | None) -> int:
    """NSGA-II's population for a budget of ``max_trials`` (see the module docstring).

    Raises AutopruneError when the budget cannot fill two generations of the smallest population.
    """
    if max_trials is None:
        return NSGA2_TIME_POPULATION
    if max_trials < 2 * NSGA2_MIN_POPULATION:
        raise AutopruneError(f"sampler nsga2 needs at least {2 * NSGA2_MIN_POPULATION} trials (two generations of "
                             f"{NSGA2_MIN_POPULATION}); the budget allows {max_trials}: raise budget.max_trials or "
                             "use sampler: tpe")
    return max(NSGA2_MIN_POPULATION, min(NSGA2_MAX_POPULATION, max_trials // NSGA2_GENERATIONS))


def make_sampler(name: str, seed: int | None, max_trials: int | None = None,
                 workers: int = 1) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` for a study of at most ``max_trials`` trials run by ``workers`` processes."""
    if name == "tpe":
        with warnings.catch_warnings():
            # only Optuna's notice that multivariate/group/constant_liar are "experimental" (they have
            # been since Optuna 2.x); any other warning still shows
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=workers > 1)
    if name == "nsga2":
        population = nsga2_population(max_trials)
        log.info("NSGA-II population %d for a budget of %s trials", population, max_trials or "unlimited")
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AutopruneError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
