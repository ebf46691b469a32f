"""Parameter importance per objective: fANOVA over the complete trials of a study.

Optuna 5's default evaluator (PED-ANOVA) compares the top quantile of trials with the rest and
assumes the objective is *minimised* unless told otherwise: on a study that maximises accuracy it
ranks toward lower accuracy, and with 15 complete trials its top 10 % is 2 trials. fANOVA
(Hutter, Hoos and Leyton-Brown, ICML 2014; Optuna's ``FanovaImportanceEvaluator``) fits a random
forest to the objective and decomposes its variance over the sampled space into each parameter's
main effect (the variance it explains on its own) and interactions. The number reported is Optuna's
default, the *normalised share*: a parameter's main-effect variance divided by the sum of the main
effects of all parameters, so the shares of an objective sum to 1. Interactions are in neither, so a
share is not a fraction of the objective's total variance (on the digits demo the accuracy's
shares 0.57 / 0.32 are 0.51 / 0.29 of its variance, 10.5 % of which is interactions). It does not
depend on the direction (maximised or minimised, the variance is the same). Below :data:`MIN_TRIALS` complete
trials a forest over a handful of points says nothing, so no table is computed.

Parameters are those every complete trial has (Optuna's intersection space): a method's own
parameters (``resrep.penalty``) and the searched allocation's shape exist only in some trials and
are left out. Warnings from Optuna are not silenced.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

MIN_TRIALS = 10  # complete trials below which no importance is computed
LABEL = ("fANOVA importance as normalised shares: a parameter's main-effect variance (the objective's variance "
         "over the sampled space that the parameter explains on its own; random-forest functional ANOVA, Hutter "
         "et al. 2014, as Optuna's FanovaImportanceEvaluator computes it) divided by the sum over the parameters, "
         "so each column sums to 1; interactions between parameters are in neither, so a share is not a fraction "
         "of the total variance (direction-independent; parameters every complete trial has)")
SHARE_SUFFIX = "_share"  # importance.csv's column of an objective: "<objective>_share"
BY_CONSTRUCTION = 0.98  # |Spearman| at or above which a parameter sets an objective by construction


def param_importance(trials: Sequence[FrozenTrial], objectives: Sequence[str], directions: Sequence[str],
                     min_trials: int = MIN_TRIALS, seed: int = 0) -> dict[str, dict[str, float]]:
    """objective -> parameter -> normalised fANOVA share (sums to 1 per objective; see the module
    docstring: main effects only), from COMPLETE ``trials``.

    ``objectives`` names the values in order, ``directions`` gives each one's direction
    ("maximize" | "minimize"; recorded with the study so a reader of the table can tell, fANOVA
    itself does not need it). Returns {} below ``min_trials`` complete trials. An objective whose
    evaluation fails (e.g. a constant value) is left out with a logged warning naming the reason.
    """
    import optuna

    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None]
    if len(complete) < min_trials:
        log.info("parameter importance needs at least %d complete trials (have %d)", min_trials, len(complete))
        return {}
    if len(directions) != len(objectives):
        raise ValueError(f"{len(objectives)} objectives but {len(directions)} directions")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line; warnings still show
    study = optuna.create_study(directions=list(directions))
    study.add_trials(complete)
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(objectives):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        try:
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                          target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError) as exc:  # constant objective, no common parameter, ...
            log.warning("parameter importance for %s unavailable: %s", name, " ".join(str(exc).split()))
            continue
        out[name] = {k: float(v) for k, v in imp.items() if math.isfinite(v)}
    return out


def by_construction(values: Mapping[str, Sequence[float]], objective: Sequence[float],
                    threshold: float = BY_CONSTRUCTION) -> list[str]:
    """Parameters whose values set ``objective`` by construction: |Spearman rank correlation| >=
    ``threshold`` (e.g. the MACs target and the MACs a trial ends with: the allocator hits the
    target within 1 % of the base). Non-numeric or constant columns are skipped."""
    import pandas as pd

    y = pd.Series(list(objective), dtype=float)
    out = []
    for name, col in values.items():
        x = pd.to_numeric(pd.Series(list(col)), errors="coerce")
        ok = x.notna() & y.notna()
        if ok.sum() < 3 or x[ok].nunique() < 2 or y[ok].nunique() < 2:
            continue
        rho = x[ok].rank().corr(y[ok].rank())
        if rho is not None and math.isfinite(rho) and abs(rho) >= threshold:
            out.append(name)
    return out
