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

Both backends re-seed the sampler before every trial from (spec seed, slot) (:func:`trial_seed`), so a
killed and resumed search proposes what an uninterrupted one would. This module is the one home of
the sampler names (:data:`SAMPLERS`: the spec, its schema and the CLI read them here); Optuna is
imported only when a sampler is built.
"""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from ..errors import AutopruneError

if TYPE_CHECKING:
    import optuna

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
    import optuna

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


def trial_seed(seed: int | None, slot: int) -> int | None:
    """The sampler's seed for the trial in ``slot`` (its place among non-interrupted trials).

    A fresh sampler seeded from (spec seed, slot) for every ask makes the proposals a function of
    the seed and the study's history alone, so a killed and resumed search proposes what the
    uninterrupted one would (TPE, NSGA-II and random sampling keep no other state between trials:
    they rebuild everything from the stored trials). None stays unseeded.
    """
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(slot)]).generate_state(1)[0] & 0x7FFFFFFF)
