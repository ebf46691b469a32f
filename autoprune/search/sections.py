"""The sections of a search spec: the frozen configs (:class:`Budget`, :class:`EarlyStop`,
:class:`Screen`) and one checker per top-level key, each turning a raw YAML value into a checked value
or a one-line :class:`~autoprune.errors.SpecError` (through :class:`~autoprune.search.validate.SpaceChecker`).
:mod:`autoprune.search.spec` assembles them into a :class:`~autoprune.search.spec.SearchSpec`.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .. import limits
from ..data.datasets import DataSpec
from ..errors import AutopruneError
from .validate import SpaceChecker, parse_time

log = logging.getLogger(__name__)

SECOND_OBJECTIVES = ("macs", "params", "latency")
DATA_PREFIXES = ("npz:", "imagefolder:")
DEFAULT_MAX_TRIALS = 20


@dataclass(frozen=True)
class Budget:
    max_trials: int | None = None
    time_s: float | None = None
    device_hours: float | None = None
    compute_s: float | None = None  # measured seconds of trial work (the trials' work_s summed)


@dataclass(frozen=True)
class EarlyStop:
    """Two-objective early stopping (:mod:`autoprune.search.early_stop`)."""

    enabled: bool = True
    # stop when accuracy is this far below the reference at the same position of the schedule;
    # None: se_multiple standard errors of an accuracy on the validation split (from its size)
    margin: float | None = None
    se_multiple: float = 1.0
    min_epochs: int = 1  # never stop before this many epochs of the trial
    min_trials: int = 3  # finished trials needed before anything is compared
    # a finished trial up to this much (relative) more expensive still counts as no more expensive
    cost_tolerance: float = 0.01


@dataclass(frozen=True)
class Screen:
    """The zero-training fidelity rung (:func:`autoprune.search.early_stop.screen_out`): a candidate is
    fine-tuned only if its accuracy right after surgery + BN recalibration is in the best ``keep``
    share of the earlier candidates within ``bucket / 2`` of its MACs fraction, once
    ``min_peers`` of them exist, counting only candidates ahead of it by more than ``se_multiple``
    standard errors of a validation accuracy. Screened-out candidates cost seconds and count as trials.
    ``round``: before the first trial, every one-shot method's fidelity at each target window (the
    screening round, :mod:`autoprune.search.rounds`); the best of each window is fine-tuned first, then
    every training-time method at the lowest window, then the runners-up."""

    enabled: bool = False
    keep: float = 0.3
    bucket: float = 0.1
    min_peers: int = 3
    se_multiple: float = 1.0
    round: bool = False
    sensitivity: bool = False  # the round also queues a searched trial with a sensitivity-seeded shape


def parse_output(chk: SpaceChecker, value: Any) -> int | str | None:
    """``output``: which model output is the logits, an index or a key (default: the rule of
    :mod:`autoprune.models.outputs`)."""
    from ..models.outputs import parse_selector

    try:
        return parse_selector(value)
    except AutopruneError as exc:
        raise chk.err("output", str(exc)) from None


def parse_augment(chk: SpaceChecker, value: Any, data: Any) -> tuple[str, ...]:
    """``augment``: none (default) | auto (what suits the data set) | crop,flip or a list of those."""
    from ..data.datasets import parse_augmentation

    name = data.get("name", "") if isinstance(data, Mapping) else str(data)
    try:
        return parse_augmentation(value, str(name))
    except AutopruneError as exc:
        raise chk.err("augment", str(exc)) from None


def parse_optional(chk: SpaceChecker, d: Mapping, section: str, key: str, low: float, high: float,
              low_open: bool = True) -> float | None:
    if d.get(key) is None:
        return None
    return chk.number(d[key], f"{section}.{key}", low, high, low_open=low_open)


def parse_model(chk: SpaceChecker, value: Any) -> str:
    from ..models.registry import TORCHVISION_PREFIX, list_models

    name = chk.string(value, "model")
    if name in list_models():
        return name
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        tv = name[len(TORCHVISION_PREFIX):]
        if tv not in torchvision.models.list_models():
            raise chk.err("model", f"unknown torchvision model {tv!r}; see torchvision.models.list_models()")
        return name
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
        return name  # package.module:function, imported when the model is built
    raise chk.err("model", f"unknown model {name!r}; {chk.hint(name, list_models())}; "
                           "or use torchvision:<name> or package.module:function")


def parse_data(chk: SpaceChecker, value: Any) -> DataSpec:
    d = {"name": value} if isinstance(value, str) else value
    if not isinstance(d, dict):
        raise chk.err("data", f"must be a data set name or a mapping with 'name', got {value!r}")
    known = [f.name for f in fields(DataSpec)]
    chk.keys(d, "data", known, what="key")
    if "name" not in d:
        raise chk.err("data.name", "missing; e.g. data: {name: digits, seed: 0}")
    out: dict[str, Any] = {"name": _data_name(chk, chk.string(d["name"], "data.name")),
                           "seed": chk.integer(d.get("seed", 0), "data.seed", 0, limits.MAX_SEED)}
    for key in ("val_fraction", "test_fraction"):
        if key in d:
            out[key] = chk.number(d[key], f"data.{key}", 0.0, 1.0, high_open=True, low_open=False)
    if d.get("image_size") is not None:
        out["image_size"] = chk.integer(d["image_size"], "data.image_size", 1, limits.MAX_IMAGE_SIZE)
    if d.get("root") is not None:
        out["root"] = chk.string(d["root"], "data.root")
    try:
        return DataSpec(**out)
    except AutopruneError as exc:
        raise chk.err("data", str(exc)) from None


def _data_name(chk: SpaceChecker, name: str) -> str:
    """A known data set (lower-cased) or ``npz:``/``imagefolder:`` with its path relative to the spec."""
    from ..data.datasets import TORCHVISION_SETS

    plain = ("digits", "synthetic", *TORCHVISION_SETS)
    prefix = next((p for p in DATA_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        location = name[len(prefix):]
        if not location:
            raise chk.err("data.name", f"{prefix}<path> needs a path after {prefix!r}")
        return prefix + parse_relative_to_spec(chk, location)
    if name.lower() in plain:
        return name.lower()
    raise chk.err("data.name", f"unknown data set {name!r}; {chk.hint(name, list(plain))}; "
                               "or npz:<path> or imagefolder:<dir>")


def parse_relative_to_spec(chk: SpaceChecker, path: str) -> str:
    """Paths in a spec are relative to the spec file (an override's path is already absolute)."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(chk.source)), path))


def parse_base(chk: SpaceChecker, value: Any) -> str | None:
    if value is None:
        return None
    path = parse_relative_to_spec(chk, chk.string(value, "base"))
    if os.path.isdir(path):
        raise chk.err("base", f"{path} is a folder; give the checkpoint file in it (e.g. {os.path.join(path, 'base.pt')})")
    if not os.path.isfile(path):
        raise chk.err("base", f"checkpoint {path} not found; fix the path or set base: null to train one")
    return path


def parse_device(chk: SpaceChecker, value: Any) -> str:
    device = chk.string(value, "device").lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise chk.err("device", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N")
    return device


def parse_objectives(chk: SpaceChecker, value: Any) -> tuple[str, str]:
    if isinstance(value, str):
        value = ["val_acc", value]
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise chk.err("objectives", f"must be two names [val_acc, macs|params|latency], got {value!r}")
    first, second = value
    if first != "val_acc":
        raise chk.err("objectives", f"the first objective must be val_acc (maximised), got {first!r}")
    if second not in SECOND_OBJECTIVES:
        raise chk.err("objectives", f"unknown objective {second!r}; the second is one of "
                                    f"{', '.join(SECOND_OBJECTIVES)} (minimised)")
    return ("val_acc", second)


def parse_budget(chk: SpaceChecker, value: Any) -> Budget:
    value = value or {}
    chk.keys(value, "budget", ("max_trials", "time", "device_hours", "compute"), what="key")
    max_trials = value.get("max_trials")
    if max_trials is not None:
        max_trials = chk.integer(max_trials, "budget.max_trials", 1, limits.MAX_TRIALS)
    time_s = value.get("time")
    if time_s is not None:
        try:
            time_s = parse_time(time_s)
        except ValueError as exc:
            raise chk.err("budget.time", str(exc)) from None
    hours = value.get("device_hours")
    if hours is not None:
        hours = chk.number(hours, "budget.device_hours", 0.0, low_open=True)
    compute = value.get("compute")
    if compute is not None:
        try:
            compute = parse_time(compute)
        except ValueError as exc:
            raise chk.err("budget.compute", str(exc)) from None
    if max_trials is None and time_s is None and hours is None and compute is None:
        max_trials = DEFAULT_MAX_TRIALS
    return Budget(max_trials=max_trials, time_s=time_s, device_hours=hours, compute_s=compute)


def parse_early_stop(chk: SpaceChecker, value: Any) -> EarlyStop:
    if isinstance(value, bool):
        value = {"enabled": value}
    value = value or {}
    chk.keys(value, "early_stop", [f.name for f in fields(EarlyStop)], what="key")
    d = EarlyStop()
    margin = value.get("margin", d.margin)
    if margin is not None:
        margin = chk.number(margin, "early_stop.margin", 0.0, 1.0, high_open=True)
    return EarlyStop(
        enabled=chk.boolean(value.get("enabled", d.enabled), "early_stop.enabled"),
        margin=margin,
        se_multiple=chk.number(value.get("se_multiple", d.se_multiple), "early_stop.se_multiple", 0.0),
        min_epochs=chk.integer(value.get("min_epochs", d.min_epochs), "early_stop.min_epochs", 0),
        min_trials=chk.integer(value.get("min_trials", d.min_trials), "early_stop.min_trials", 1),
        cost_tolerance=chk.number(value.get("cost_tolerance", d.cost_tolerance), "early_stop.cost_tolerance",
                                  0.0, 0.5),
    )


def parse_screen(chk: SpaceChecker, value: Any) -> Screen:
    if value is None:
        value = False
    if isinstance(value, bool):
        value = {"enabled": value}
    value = value or {}
    chk.keys(value, "screen", [f.name for f in fields(Screen)], what="key")
    d = Screen()
    return Screen(
        enabled=chk.boolean(value.get("enabled", True), "screen.enabled"),
        keep=chk.number(value.get("keep", d.keep), "screen.keep", 0.0, 1.0, low_open=True),
        bucket=chk.number(value.get("bucket", d.bucket), "screen.bucket", 0.0, 1.0, low_open=True),
        min_peers=chk.integer(value.get("min_peers", d.min_peers), "screen.min_peers", 1),
        se_multiple=chk.number(value.get("se_multiple", d.se_multiple), "screen.se_multiple", 0.0),
        round=chk.boolean(value.get("round", True), "screen.round"),
        sensitivity=chk.boolean(value.get("sensitivity", d.sensitivity), "screen.sensitivity"),
    )


def parse_allocation(chk: SpaceChecker, value: Any) -> dict[str, Any]:
    """Fixed AllocationConfig fields (mode and multipliers are searched in ``space``)."""
    from ..engine.allocate import AllocationConfig
    from .space import SEARCHED_ALLOCATION

    value = value or {}
    defaults = {f.name: getattr(AllocationConfig(), f.name) for f in fields(AllocationConfig)
                if f.name not in SEARCHED_ALLOCATION}
    chk.keys(value, "allocation", list(defaults), what="key",
             extra="; mode and multipliers are searched: set them under space")
    out: dict[str, Any] = {}
    for key, default in defaults.items():
        v = value.get(key, default)
        path = f"allocation.{key}"
        if key == "round_to" and str(v).strip().lower() == "auto":
            out[key] = "auto"  # per layer, the fastest multiple the latency model finds (objective latency)
        elif isinstance(default, int):
            out[key] = chk.integer(v, path, 1)
        elif isinstance(default, float):
            out[key] = chk.number(v, path, 0.0, 1.0, low_open=False)
        else:
            out[key] = chk.string(v, path)
    try:
        AllocationConfig(mode="global", **out)
    except AutopruneError as exc:
        raise chk.err("allocation", str(exc)) from None
    return out
