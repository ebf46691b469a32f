"""The search space: how a searchable value is represented, sampled and turned into prune args.

A value in ``space`` (and in ``space.methods.<method>``) is fixed (``3``), a list of categorical
choices (``[uniform, global]``) or a numeric :class:`Range` (``{low: 1e-5, high: 1e-3, log: true}``).
:func:`suggest` samples one trial's parameters with Optuna's define-by-run API: the method first,
then only that method's parameters (named ``"<method>.<param>"`` inside Optuna so that two methods
never share a distribution), and the per-layer shape only when the ``searched`` allocation is chosen.

The per-layer shape (``allocation: searched``) of K depth buckets: only ratios between the buckets'
keep-ratio multipliers matter (the allocator scales them to hit the MACs target), so the space has
K-1 free values, ``shape_1..shape_{K-1}``: log2 of bucket i's multiplier relative to bucket 0's
(range ``space.log_ratio``, default [-1, 1]: half to twice), plus ``shape_residual``: log2 of an
extra multiplier for residual-coupled channel groups (``space.residual``; > 0 spares the residual
stream as the papers do, fixed 0 for a model without residual groups). Trials of older studies with
``mult_0..mult_{K-1}`` still load. Fixed values are returned but never handed to Optuna, so they
do not dilute parameter importance. Checking the values a spec gives is
:mod:`autoprune.search.validate`'s job.

Distillation (``space.distill``: the weight of the KL term to the base model's logits in the fine-tune
after surgery, 0 = off, default; ``space.distill_temperature``, sampled only when the weight is not 0):
a trial's parameters hold ``distill`` only when the space can turn it on. The weight applies while the
teacher is ahead: :mod:`autoprune.search.distillation` drops the teacher once a student
reaches the base's validation accuracy.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import AutopruneError

if typing.TYPE_CHECKING:
    import optuna

    from ..engine.allocate import AllocationConfig

# search parameters every trial has; a method parameter with one of these names is kept as "<method>.<name>"
TRIAL_KEYS = ("method", "target", "allocation", "epochs", "lr", "batch_size", "distill", "distill_temperature")
_MULT = re.compile(r"mult_(\d+)")  # older studies: one multiplier per bucket
_SHAPE = re.compile(r"shape_(\d+)")
RESIDUAL = "shape_residual"
SEARCHED_ALLOCATION = ("mode", "multipliers", "residual_multiplier")  # AllocationConfig fields the search sets


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False


# a fixed value | a list of categorical choices | a numeric Range (tuples: a fixed sequence parameter)
ParamSpace = Range | list | tuple | str | int | float | bool | None


class SpaceSpec(Protocol):
    """What :func:`suggest` reads of a :class:`~autoprune.search.spec.SearchSpec` (a protocol, so that
    this module, below the spec in the import graph, never imports it)."""

    @property
    def space(self) -> Mapping[str, ParamSpace]: ...

    @property
    def method_space(self) -> Mapping[str, Mapping[str, ParamSpace]]: ...


def space_to_yaml(value: ParamSpace) -> Any:
    if isinstance(value, Range):
        out: dict[str, Any] = {"low": value.low, "high": value.high, "log": value.log}
        if value.step is not None:
            out["step"] = value.step
        return out
    if isinstance(value, tuple):
        return list(value)
    return value


# --------------------------------------------------------------------------- sampling


def _sample(trial: optuna.trial.BaseTrial, name: str, value: ParamSpace) -> Any:
    if isinstance(value, Range):
        if value.integer:
            return trial.suggest_int(name, int(value.low), int(value.high), step=int(value.step or 1), log=value.log)
        return trial.suggest_float(name, value.low, value.high, step=value.step, log=value.log)
    if isinstance(value, list):
        return value[0] if len(value) == 1 else trial.suggest_categorical(name, value)
    return value


def param_name(method: str, param: str) -> str:
    """The flat name of a method parameter in :func:`suggest`'s dict (and trials.csv's ``param_``)."""
    return f"{method}.{param}" if param in TRIAL_KEYS or _shape_key(param) else param


def _shape_key(key: str) -> bool:
    return bool(_MULT.fullmatch(key) or _SHAPE.fullmatch(key) or key == RESIDUAL)


def suggest(trial: optuna.trial.BaseTrial, spec: SpaceSpec) -> dict[str, Any]:
    """One trial's parameters, sampled in a fixed order (deterministic under a seeded sampler)."""
    space = spec.space
    out: dict[str, Any] = {"method": _sample(trial, "method", space["method"]),
                           "target": _sample(trial, "target", space["target"]),
                           "allocation": _sample(trial, "allocation", space["allocation"])}
    if out["allocation"] == "searched":
        for i in range(1, int(space["buckets"])):
            out[f"shape_{i}"] = _sample(trial, f"shape_{i}", space["log_ratio"])
        out[RESIDUAL] = _sample(trial, RESIDUAL, space["residual"])
    for key in ("epochs", "lr", "batch_size"):
        out[key] = _sample(trial, key, space[key])
    if space.get("distill", 0.0) != 0.0:  # distillation from the base model (off by default: no key at all)
        out["distill"] = _sample(trial, "distill", space["distill"])
        if out["distill"]:
            out["distill_temperature"] = _sample(trial, "distill_temperature", space.get("distill_temperature", 4.0))
    method = out["method"]
    for pname, value in spec.method_space.get(method, {}).items():
        out[param_name(method, pname)] = _sample(trial, f"{method}.{pname}", value)
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == "")


def to_prune_args(params: Mapping[str, Any], allocation: Mapping[str, Any] | None = None
                  ) -> tuple[str, float, AllocationConfig, dict[str, Any], int, float]:
    """``suggest``'s dict (or a trials.csv row) -> (method, target, AllocationConfig, method params, epochs, lr).

    ``allocation`` holds the spec's fixed AllocationConfig fields (``spec.allocation``). In a
    trials.csv row, method parameters are the ``param_*`` columns; blanks are skipped.
    """
    from ..engine.allocate import AllocationConfig

    csv_row = any(str(k).startswith("param_") for k in params)
    flat = _flat(params, csv_row)
    for key in ("method", "target", "epochs", "lr"):
        if key not in flat:
            raise AutopruneError(f"trial parameters have no {key!r}; got {', '.join(sorted(flat)) or 'nothing'}")
    method = str(flat["method"])
    mode = str(flat.get("allocation", "global"))
    cfg = AllocationConfig(mode=mode, **_shape(flat, mode), **dict(allocation or {}))
    return (method, float(flat["target"]), cfg, _method_params(flat, method, csv_row), int(float(flat["epochs"])),
            float(flat["lr"]))


def _flat(params: Mapping[str, Any], csv_row: bool) -> dict[str, Any]:
    """The set parameters by name (a trials.csv row: ``param_`` prefixes dropped, result columns left out)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        key = str(key)
        if _missing(value):
            continue
        if csv_row:
            if key.startswith("param_"):
                key = key[len("param_"):]
            elif key not in TRIAL_KEYS:
                continue  # a result column (number, val_acc, macs, ...)
        flat[key] = value.item() if hasattr(value, "item") else value
    return flat


def _method_params(flat: Mapping[str, Any], method: str, csv_row: bool) -> dict[str, Any]:
    """``method``'s own parameters among ``flat`` (``<method>.<name>`` or plain), strings read back as
    the booleans and sequences the method's Params declare (trials.csv holds them as text)."""
    from ..methods import get_method

    fields = {f.name: f for f in dataclasses.fields(get_method(method).Params)}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in TRIAL_KEYS or _shape_key(key):
            continue
        owner, dot, pname = key.rpartition(".")
        if dot and owner != method:
            continue
        key = pname if dot else key
        if not dot and csv_row and key not in fields:
            continue
        default = fields[key].default if key in fields else None
        if isinstance(default, bool) and isinstance(value, str):
            value = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(default, (tuple, list)) and isinstance(value, str):
            value = _parse_seq(value)
        out[key] = value
    return out


def _shape(flat: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """AllocationConfig's multipliers and residual multiplier from the flat parameters (searched mode)."""
    if mode != "searched":
        return {}
    mults = sorted((int(m.group(1)), float(v)) for k, v in flat.items() if (m := _MULT.fullmatch(k)))
    if mults:  # an older study's trial: one multiplier per bucket
        return {"multipliers": tuple(v for _, v in mults)}
    logs = sorted((int(m.group(1)), float(v)) for k, v in flat.items() if (m := _SHAPE.fullmatch(k)))
    if [i for i, _ in logs] != list(range(1, len(logs) + 1)):
        raise AutopruneError(f"searched allocation needs shape_1..shape_{len(logs)}; got shape_{[i for i, _ in logs]}")
    return {"multipliers": (1.0, *(2.0 ** v for _, v in logs)),
            "residual_multiplier": 2.0 ** float(flat.get(RESIDUAL, 0.0))}


def _parse_seq(text: str) -> Any:
    import ast

    try:
        return tuple(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        return text
