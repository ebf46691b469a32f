"""Search specs: a YAML file -> a frozen, fully validated :class:`SearchSpec`.

Everything a search needs is checked here, before any compute: unknown keys (at any depth,
method parameters included, against the method's ``Params`` dataclass), wrong types, empty choice
lists, bad ranges, unknown models / data sets / methods / samplers / objectives. Each problem is
a one-line :class:`~autoprune.errors.SpecError` naming the file and the key path, e.g.
``search_spaces/x.yaml: space.methods.resrep.penaltyy: unknown parameter; resrep has: penalty, ...``.

Keys (defaults in brackets; only ``model`` and ``data`` are required; ``search_spaces/digits_demo.yaml``
is the commented example)::

    study [file name]   model   data: NAME | {name, seed [0], val_fraction, test_fraction, image_size, root}
    base [null: train one]  base_epochs [30]  base_lr [0.05]  device [auto]  workers [1]  seed [0]
    train_subset [null: all]: training images each trial sees (pruning calibration, BN recalibration,
        ResRep's training, the fine-tune): a fixed subset drawn with data.seed. Trials get faster in
        proportion; the fine-tune is shorter and noisier, so rankings favour methods that need little
        data (LRF's compensation, BN recalibration) and the final accuracies are lower than with the
        whole split. The base model and ``autoprune retrain`` always use the whole split.
    sampler [tpe | nsga2 | random]   objectives [[val_acc, macs]]: second is macs | params | latency
    latency: {batch_size [1], runtime [torch | onnxruntime], threads [null: the search's], rounds [5], points [5],
             clock [wall | cpu]}
             (objective latency:
             the sampled target is a fraction of the base's latency on this device)
    constraints: {min_val_acc, max_params_frac, max_macs_frac} [none]
    budget: {max_trials, time ("30m", "1h30m" or seconds), device_hours,
             compute (measured seconds of trial work: CPU time, or GPU time on a GPU; "2h" or seconds)}
            [max_trials: 20]
    early_stop: {enabled [true], margin [null: se_multiple standard errors of a val accuracy], se_multiple [1],
                 min_epochs [1], min_trials [3], cost_tolerance [0.01]}  (or just true/false)
    screen: {enabled [true when the key is given], keep [0.3], bucket [0.1], min_peers [3], se_multiple [1],
             round [true], sensitivity [false]}  [off]
    allocation: fixed AllocationConfig fields {min_channels, min_ratio, max_prune_ratio, round_to, normalise}
    space: {method [all], target [0.2..0.8], allocation [uniform, global, searched], buckets [3],
            log_ratio [-1..1] (shape_1..shape_{K-1}), residual [-1..1] (shape_residual), epochs [3],
            lr [0.01], batch_size [128], distill [0: off] (weight of distillation from the base model),
            distill_temperature [4], methods: {METHOD: {PARAM: ...}}}

A searchable value (anything under ``space``) is written one of three ways::

    epochs: 3                                   # fixed
    allocation: [uniform, global, searched]     # categorical choices
    lr: {low: 0.005, high: 0.05, log: true}     # numeric range (optional step; integer for int params)

Paths (``base``, ``npz:``/``imagefolder:`` data) are relative to the spec file.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .. import limits
from ..data.datasets import DataSpec
from ..errors import AutopruneError, SpecError
from ..files import write_text
from . import sections
from .latency_objective import parse_latency
from .samplers import SAMPLERS
from .sections import Budget, EarlyStop, Screen
from .space import Range, space_to_yaml
from .validate import SpaceChecker

log = logging.getLogger(__name__)

__all__ = ["Budget", "EarlyStop", "Range", "Screen", "SearchSpec", "dump_spec", "load_spec"]

OVERRIDES = {  # CLI override name -> key path in the spec
    "max_trials": "budget.max_trials", "time_s": "budget.time", "time": "budget.time",
    "device_hours": "budget.device_hours", "compute": "budget.compute", "workers": "workers", "seed": "seed", "device": "device",
    "early_stop": "early_stop.enabled", "sampler": "sampler", "study": "study", "base": "base",
}
TOP_KEYS = ("study", "model", "data", "base", "base_epochs", "base_lr", "device", "workers", "seed",
            "sampler", "objectives", "constraints", "budget", "early_stop", "screen", "allocation", "space", "augment",
            "latency", "train_subset", "output")


@dataclass(frozen=True)
class SearchSpec:
    study: str
    source: str
    model: str
    data: DataSpec
    base: str | None
    base_epochs: int
    base_lr: float
    device: str
    workers: int
    seed: int
    sampler: str
    objectives: tuple[str, str]
    min_val_acc: float | None
    max_params_frac: float | None
    max_macs_frac: float | None
    budget: Budget
    early_stop: EarlyStop
    space: Mapping[str, Any]
    screen: Screen = field(default_factory=Screen)
    method_space: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    allocation: Mapping[str, Any] = field(default_factory=dict)
    augment: tuple[str, ...] = ()  # training augmentation of the base model and the trials (autoprune.data.datasets)
    latency: Mapping[str, Any] = field(default_factory=dict)  # objective latency: batch_size, runtime, threads
    train_subset: int | None = None  # training images each trial sees (a fixed seeded subset); None: all
    output: int | str | None = None  # which model output is the logits (autoprune.models.outputs); None: the rule

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods a trial may use."""
        m = self.space["method"]
        return tuple(m) if isinstance(m, list) else (m,)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in) as plain YAML-ready data; loads back equal."""
        space = {k: space_to_yaml(v) for k, v in self.space.items()}
        space["methods"] = {m: {p: space_to_yaml(v) for p, v in ps.items()} for m, ps in self.method_space.items()}
        return {
            "study": self.study, "model": self.model, "data": self.data.to_dict(), "base": self.base,
            "base_epochs": self.base_epochs, "base_lr": self.base_lr, "device": self.device,
            "workers": self.workers, "seed": self.seed, "sampler": self.sampler,
            "objectives": list(self.objectives),
            "constraints": {"min_val_acc": self.min_val_acc, "max_params_frac": self.max_params_frac,
                            "max_macs_frac": self.max_macs_frac},
            "budget": {"max_trials": self.budget.max_trials, "time": self.budget.time_s,
                       "device_hours": self.budget.device_hours, "compute": self.budget.compute_s},
            "early_stop": {f.name: getattr(self.early_stop, f.name) for f in fields(EarlyStop)},
            "screen": {f.name: getattr(self.screen, f.name) for f in fields(Screen)},
            "allocation": dict(self.allocation),
            "augment": list(self.augment),
            "latency": dict(self.latency),
            "train_subset": self.train_subset,
            "space": space,
        } | ({"output": self.output} if self.output is not None else {})


def load_spec(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> SearchSpec:
    """Read and validate a spec file; ``overrides`` (CLI options, ``None`` = not given) win over it."""
    source = os.fspath(path)
    if os.path.isdir(source):
        raise SpecError(f"{source} is a folder, not a spec file; give a YAML file, e.g. search_spaces/digits_demo.yaml")
    if not os.path.isfile(source):
        raise SpecError(f"{source}: spec file not found")
    try:
        with open(source, "rb") as fh:
            data = fh.read()
        text = data.decode("utf-8")
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except OSError as exc:
        raise SpecError(f"{source}: cannot read the spec ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save the spec "
                        "as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise SpecError(f"{source}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raise SpecError(f"{source}: the spec is empty; give at least model: and data:, e.g. model: small_cnn "
                        "and data: digits")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a mapping of keys (model, data, space, ...)")
    chk = SpaceChecker(source)
    raw = _apply_overrides(chk, raw, overrides or {})
    return _build(chk, raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (by default the last one wins)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key != "<<" and isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first at line {seen[key] + 1}); keep one", key_node.start_mark)
        seen.setdefault(key, key_node.start_mark.line)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def dump_spec(spec: SearchSpec, path: str | os.PathLike) -> None:
    """Write the resolved spec as YAML (``load_spec`` reads it back to an equal spec)."""
    header = (f"# Resolved search spec for study {spec.study!r} (from {spec.source}).\n"
              "# Every default is filled in; budget.time is in seconds.\n")
    write_text(path, header + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None))


# --------------------------------------------------------------------------- building


def _apply_overrides(chk: SpaceChecker, raw: dict, overrides: Mapping[str, Any]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, value in overrides.items():
        if name not in OVERRIDES:
            raise SpecError(f"override {name!r} is unknown; known: {', '.join(sorted(OVERRIDES))}")
        if value is None:
            continue
        key_path = OVERRIDES[name]
        if name == "base":
            value = os.path.abspath(os.fspath(value))
        if "." in key_path:
            section, key = key_path.split(".")
            current = raw.get(section)
            if isinstance(current, bool) and section == "early_stop":
                current = {"enabled": current}
            if current is None:
                current = {}
            if not isinstance(current, dict):
                raise chk.err(section, f"must be a mapping, got {current!r}")
            raw[section] = {**current, key: value}
        else:
            raw[key_path] = value
        chk.overridden[key_path] = name
    return raw


def _build(chk: SpaceChecker, raw: dict) -> SearchSpec:
    chk.keys(raw, "", TOP_KEYS, what="key")
    if "model" not in raw:
        raise chk.err("model", "missing; name a model, e.g. model: small_cnn")
    if "data" not in raw:
        raise chk.err("data", "missing; name a data set, e.g. data: digits")
    study = chk.string(raw.get("study", os.path.splitext(os.path.basename(chk.source))[0]), "study")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
        raise chk.err("study", f"{study!r} is not a usable folder name; use letters, digits, '_', '-', '.'")
    sampler = chk.string(raw.get("sampler", "tpe"), "sampler").lower()
    if sampler not in SAMPLERS:
        raise chk.err("sampler", f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    constraints = raw.get("constraints") or {}
    chk.keys(constraints, "constraints", ("min_val_acc", "max_params_frac", "max_macs_frac"), what="constraint")
    min_acc = sections.parse_optional(chk, constraints, "constraints", "min_val_acc", 0.0, 1.0, low_open=False)
    max_params = sections.parse_optional(chk, constraints, "constraints", "max_params_frac", 0.0, 1.0)
    max_macs = sections.parse_optional(chk, constraints, "constraints", "max_macs_frac", 0.0, 1.0)
    from .validate import parse_space  # the search-space half of the spec

    space, method_space = parse_space(chk, raw.get("space"))
    budget = sections.parse_budget(chk, raw.get("budget"))
    if sampler == "nsga2":
        from .samplers import nsga2_population

        try:
            nsga2_population(budget.max_trials)
        except AutopruneError as exc:
            raise chk.err("sampler", str(exc)) from None
    objectives = sections.parse_objectives(chk, raw.get("objectives", ["val_acc", "macs"]))
    allocation = sections.parse_allocation(chk, raw.get("allocation"))
    if allocation.get("round_to") == "auto" and objectives[1] != "latency":
        raise chk.err("allocation.round_to", "auto needs objectives: [val_acc, latency] (the multiples come from the "
                                             "device's latency model); use 1, 8, 16 or 32")
    return SearchSpec(
        study=study, source=chk.source, model=sections.parse_model(chk, raw["model"]), data=sections.parse_data(chk, raw["data"]),
        base=sections.parse_base(chk, raw.get("base")), base_epochs=chk.integer(raw.get("base_epochs", 30), "base_epochs", 0, limits.MAX_EPOCHS),
        base_lr=chk.number(raw.get("base_lr", 0.05), "base_lr", 0.0, low_open=True),
        device=sections.parse_device(chk, raw.get("device", "auto")), workers=chk.integer(raw.get("workers", 1), "workers", 1, limits.max_workers()),
        seed=chk.integer(raw.get("seed", 0), "seed", 0, limits.MAX_SEED), sampler=sampler,
        objectives=objectives,
        min_val_acc=min_acc, max_params_frac=max_params, max_macs_frac=max_macs,
        budget=budget, early_stop=sections.parse_early_stop(chk, raw.get("early_stop", True)),
        space=space, method_space=method_space, allocation=allocation,
        screen=sections.parse_screen(chk, raw.get("screen", False)),
        augment=sections.parse_augment(chk, raw.get("augment", "none"), raw["data"]),
        latency=parse_latency(chk, raw.get("latency")),
        train_subset=None if raw.get("train_subset") is None else chk.integer(raw["train_subset"], "train_subset", 1),
        output=sections.parse_output(chk, raw.get("output")),
    )




def spec_from_dict(raw: Mapping[str, Any], source: str = "<dict>", overrides: Mapping[str, Any] | None = None
                   ) -> SearchSpec:
    """Validate a spec given as plain data (the keys of a spec file); ``source`` names it in errors and
    anchors relative paths (a file name, or ``<dict>``: relative to the working directory). Without a
    ``study`` key a dict's study is called ``search``."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{source}: a spec must be a mapping of keys (model, data, space, ...), got "
                        f"{type(raw).__name__}")
    raw = dict(raw)
    if source == "<dict>":
        raw.setdefault("study", "search")
    chk = SpaceChecker(source)
    return _build(chk, _apply_overrides(chk, raw, overrides or {}))
