"""The JSON Schema of a search spec (``autoprune schema > spec.schema.json``), for editors.

Built from the same tables the checker uses (:func:`autoprune.search.validate.space_kinds`, each
method's ``Params`` dataclass, the spec's key lists, :class:`~autoprune.data.datasets.DataSpec`,
:class:`~autoprune.engine.allocate.AllocationConfig`), so it cannot drift from :func:`load_spec`. With
the YAML language server (VS Code's YAML extension, Neovim's yamlls) put
``# yaml-language-server: $schema=spec.schema.json`` on a spec's first line for completion,
hover text and red squiggles. The schema is the shape; :func:`load_spec` still does the checks a
schema cannot express (paths exist, ``low <= high``, a method's own value checks).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .samplers import SAMPLERS
from .sections import DEFAULT_MAX_TRIALS, SECOND_OBJECTIVES, EarlyStop
from .validate import Kind, param_kind, space_kinds

DRAFT = "https://json-schema.org/draft/2020-12/schema"
NUMBER_TEXT = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"  # YAML 1.1 reads 1e-5 as a string
DURATION = r"^\s*(\d+(\.\d+)?\s*[dhms]\s*)+$"


def _number(low: float | None = None, high: float | None = None, low_open: bool = False,
            integer: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer" if integer else "number"}
    if low is not None:
        out["exclusiveMinimum" if low_open else "minimum"] = low
    if high is not None:
        out["maximum"] = high
    if integer:
        return out
    return {"anyOf": [out, {"type": "string", "pattern": NUMBER_TEXT}]}


def _scalar(kind: Kind) -> dict[str, Any]:
    if kind.type == "float":
        out = _number(kind.low, kind.high, kind.low_open)
    elif kind.type == "int":
        out = _number(None if kind.low is None else int(kind.low), integer=True)
    elif kind.type == "bool":
        out = {"type": "boolean"}
    elif kind.type == "str":
        out = {"type": "string", **({"enum": list(kind.choices)} if kind.choices else {})}
    elif kind.type == "seq":
        out = {"type": "array"}
    else:
        out = {"type": ["number", "string", "boolean", "null"]}
    if kind.nullable:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _searchable(kind: Kind, description: str = "") -> dict[str, Any]:
    """A fixed value, a list of choices, or a {low, high, log, step} range (numbers only)."""
    one = _scalar(kind)
    options = [one]
    if not kind.fixed_only and kind.type != "seq":
        options.append({"type": "array", "items": one, "minItems": 1, "description": "categorical choices"})
    if not kind.fixed_only and kind.type in ("float", "int", "any"):
        bound = _scalar(Kind(kind.type if kind.type != "any" else "float", kind.low, kind.high, kind.low_open))
        options.append({"type": "object", "description": "a numeric range", "required": ["low", "high"],
                        "additionalProperties": False,
                        "properties": {"low": bound, "high": bound, "log": {"type": "boolean"},
                                       "step": _number(0, low_open=True, integer=kind.type == "int")}})
    out: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**out, "description": description} if description else out


def _closed(properties: dict[str, Any], required: list[str] | None = None, description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def _method_params() -> dict[str, Any]:
    from ..methods import get_method, list_methods

    out = {}
    for name in list_methods():
        method = get_method(name)
        props = {}
        for f in dataclasses.fields(method.Params):
            kind, default = param_kind(method, f)
            doc = "" if default is dataclasses.MISSING else f"default: {default!r}"
            props[f.name] = _searchable(kind, doc)
        out[name] = _closed(props, description=f"{name}'s parameters, sampled only when {name} is chosen")
    return out


def _model() -> dict[str, Any]:
    from ..models.registry import list_models

    return {"description": "a registry model, torchvision:<name>, or package.module:function",
            "anyOf": [{"enum": list(list_models())}, {"type": "string", "pattern": r"^torchvision:\w+$"},
                      {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"}]}


def _data() -> dict[str, Any]:
    from ..data.datasets import TORCHVISION_SETS

    name = {"anyOf": [{"enum": ["digits", "synthetic", *TORCHVISION_SETS]},
                      {"type": "string", "pattern": "^(npz|imagefolder):.+"}]}
    fraction = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    mapping = _closed({"name": name, "seed": {"type": "integer", "minimum": 0}, "val_fraction": fraction,
                       "test_fraction": fraction, "image_size": {"type": ["integer", "null"], "minimum": 1},
                       "root": {"type": ["string", "null"]}}, ["name"])
    return {"description": "a data set name, or a mapping with its split", "anyOf": [name, mapping]}


def _allocation() -> dict[str, Any]:
    from ..engine.allocate import NORMALISATIONS, AllocationConfig
    from .space import SEARCHED_ALLOCATION

    props: dict[str, Any] = {}
    for f in dataclasses.fields(AllocationConfig):
        default = getattr(AllocationConfig(), f.name)
        if f.name in SEARCHED_ALLOCATION:
            continue
        if f.name == "normalise":
            props[f.name] = {"enum": list(NORMALISATIONS)}
        elif f.name == "round_to":
            props[f.name] = {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}],
                             "description": "widths in multiples of this; auto: the fastest multiple per layer "
                                            "on this device (objective latency)"}
        elif isinstance(default, int):
            props[f.name] = {"type": "integer", "minimum": 1}
        else:
            props[f.name] = {"type": "number", "minimum": 0, "maximum": 1}
    return _closed(props, description="fixed allocation settings (mode and multipliers are searched in space)")


def build_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a search spec file, as a dict."""
    kinds = space_kinds()
    space_props = {key: _searchable(kind) for key, kind in kinds.items()}
    space_props["methods"] = _closed(_method_params(), description="per-method parameter spaces")
    fraction = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
    early = {f.name: ({"type": "boolean"} if f.type in ("bool", bool) else
                      {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1,
                       "description": "null: se_multiple standard errors of a validation accuracy"}
                      if f.name == "margin" else
                      {"type": "number", "minimum": 0} if f.name == "se_multiple" else
                      {"type": "number", "minimum": 0, "maximum": 0.5} if f.name == "cost_tolerance" else
                      {"type": "integer", "minimum": 0}) for f in dataclasses.fields(EarlyStop)}
    screen = _closed({"enabled": {"type": "boolean"}, "keep": _number(0, 1, low_open=True),
                      "bucket": _number(0, 1, low_open=True), "min_peers": {"type": "integer", "minimum": 1},
                      "se_multiple": {"type": "number", "minimum": 0}, "round": {"type": "boolean"},
                      "sensitivity": {"type": "boolean"}},
                     description="fine-tune only candidates whose accuracy right after pruning is in the best "
                                 "`keep` share of their MACs bucket")
    props: dict[str, Any] = {
        "study": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                  "description": "results go to results/<study> (default: the file's name)"},
        "model": _model(),
        "data": _data(),
        "base": {"type": ["string", "null"], "description": "base checkpoint, relative to the spec; null: train one"},
        "base_epochs": {"type": "integer", "minimum": 0},
        "base_lr": _number(0, low_open=True),
        "augment": {"description": "training augmentation: none | auto (what suits the data set) | crop,flip",
                    "anyOf": [{"type": "string", "pattern": r"^\s*(auto|none|(crop|flip)(\s*,\s*(crop|flip))*)\s*$"},
                              {"type": "array", "items": {"enum": ["crop", "flip"]}}, {"type": "boolean"}]},
        "output": {"type": ["integer", "string", "null"], "minimum": 0,
                   "description": "which model output is the logits: an index of a tuple or a key of a dict "
                                  "(default: a tensor, the first tensor of a tuple, the 'logits' key of a dict)"},
        "device": {"type": "string", "pattern": r"^(auto|cpu|cuda(:\d+)?|mps)$"},
        "train_subset": {"type": ["integer", "null"], "minimum": 1,
                         "description": "training images each trial sees (a fixed seeded subset); null: all"},
        "workers": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "sampler": {"enum": list(SAMPLERS)},
        "objectives": {"description": "[val_acc, macs | params | latency]",
                       "anyOf": [{"enum": list(SECOND_OBJECTIVES)},
                                 {"type": "array", "prefixItems": [{"const": "val_acc"},
                                                                   {"enum": list(SECOND_OBJECTIVES)}],
                                  "minItems": 2, "maxItems": 2}]},
        "constraints": _closed({"min_val_acc": fraction, "max_params_frac": fraction, "max_macs_frac": fraction}),
        "budget": _closed({"max_trials": {"type": ["integer", "null"], "minimum": 1},
                           "time": {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                              {"type": "string", "pattern": DURATION}, {"type": "null"}],
                                    "description": "seconds, or e.g. 90s, 30m, 2h, 1h30m"},
                           "device_hours": {"type": ["number", "null"], "exclusiveMinimum": 0},
                           "compute": {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                                 {"type": "string", "pattern": DURATION}, {"type": "null"}],
                                       "description": "measured seconds of trial work (CPU time; GPU time on a "
                                                      "GPU), or e.g. 30m, 2h"}},
                          description=f"no new trial starts once one is spent (default: {DEFAULT_MAX_TRIALS} trials)"),
        "early_stop": {"anyOf": [{"type": "boolean"}, _closed(early)]},
        "screen": {"anyOf": [{"type": "boolean"}, {"type": "null"}, screen]},
        "allocation": _allocation(),
        "latency": _closed({"batch_size": {"type": "integer", "minimum": 1},
                            "runtime": {"enum": ["torch", "onnxruntime"]},
                            "threads": {"type": ["integer", "null"], "minimum": 1},
                            "rounds": {"type": "integer", "minimum": 1},
                            "points": {"type": "integer", "minimum": 2},
                            "clock": {"enum": ["wall", "cpu"]},
                            "feedback": {"type": "integer", "minimum": 0}},
                           description="objective latency: how it is measured on this device (default batch 1, "
                                       "torch, the search's threads; feedback: timed allocations per trial that "
                                       "close its target on measurement, default 0)"),
        "space": _closed(space_props, description="every searchable value: fixed | [choices] | {low, high, log}"),
    }
    return {"$schema": DRAFT, "title": "autoprune search spec",
            **_closed(props, ["model", "data"])}
