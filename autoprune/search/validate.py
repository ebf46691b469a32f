"""Checking a spec's values: typed reads of raw YAML that fail with one line naming file and key.

:class:`SpaceChecker` reads scalars (numbers, integers, strings, booleans, durations) and mappings
with known keys; :class:`Kind` says what one searchable value may be; :func:`parse_value` reads a
fixed value, a list of choices or a ``{low, high, log, step}`` range; :func:`parse_space` reads the
whole ``space`` section, each method's parameters checked against its ``Params`` dataclass. The same
tables (:func:`space_kinds`, :data:`SPACE_DEFAULTS`, :func:`param_kind`) feed the JSON Schema
(:mod:`autoprune.search.schema`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import limits
from ..errors import AutopruneError, SpecError, did_you_mean
from .space import ParamSpace, Range

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?\s*[dhms]\s*)+")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_time(value: Any) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"1.5d"`` or a number of seconds -> seconds (> 0)."""
    bad = ValueError(f"{value!r} is not a duration; write e.g. 90s, 30m, 2h or 1h30m")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value)):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.fullmatch(value.strip().lower()):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", value.lower()))
    else:
        raise bad
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


class SpaceChecker:
    """Typed reads of raw YAML values; every failure is a one-line SpecError naming file and key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.overridden: dict[str, str] = {}  # key path -> override name (errors then name the override)

    def err(self, path: str, msg: str) -> SpecError:
        msg = " ".join(str(msg).split())
        if path in self.overridden:
            return SpecError(f"override {self.overridden[path]} ({path}): {msg}")
        return SpecError(f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}")

    @staticmethod
    def hint(name: str, known: Sequence[str]) -> str:
        return did_you_mean(name, list(known))

    def keys(self, d: Any, path: str, known: Sequence[str], what: str = "key", extra: str = "") -> None:
        if not isinstance(d, dict):
            raise self.err(path, f"must be a mapping, got {d!r}")
        for key in d:
            if key not in known:
                import difflib

                sub = f"{path}.{key}" if path else str(key)
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                owner = path.rsplit(".", 1)[-1] if path else "the top level"
                raise self.err(sub, f"unknown {what}; {hint}{owner} has: {', '.join(known) or 'nothing'}{extra}")

    def string(self, v: Any, path: str) -> str:
        if not isinstance(v, str) or not v:
            raise self.err(path, f"must be a non-empty string, got {v!r}")
        return v

    def boolean(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.err(path, f"must be true or false, got {v!r}")
        return v

    def integer(self, v: Any, path: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(path, f"must be an integer, got {v!r}")
        if low is not None and v < low:
            raise self.err(path, f"must be >= {low}, got {v}")
        if high is not None and v > high:
            raise self.err(path, f"must be at most {high} (autoprune's cap), got {v}")
        return v

    def number(self, v: Any, path: str, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
        if isinstance(v, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(path, f"must be a number, got {v!r}")
        v = float(v)
        bad_low = low is not None and (v <= low if low_open else v < low)
        bad_high = high is not None and (v >= high if high_open else v > high)
        if bad_low or bad_high:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
            raise self.err(path, f"must be in {interval}, got {v:g}")
        return v


@dataclass(frozen=True)
class Kind:
    """What one searchable value may be: its type, bounds, allowed strings and an extra check."""

    type: str  # float | int | bool | str | seq | any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    fixed_only: bool = False
    nullable: bool = False
    check: Callable[[Any], None] | None = None  # raises AutopruneError with the problem

    def scalar(self, chk: SpaceChecker, v: Any, path: str) -> Any:
        """One value of this kind (its type, bounds, choices and own check), or SpecError naming ``path``."""
        if v is None and self.nullable:
            return None
        v = self._typed(chk, v, path)
        if self.check is not None:
            try:
                self.check(v)
            except AutopruneError as exc:
                raise chk.err(path, str(exc)) from None
        return v

    def _typed(self, chk: SpaceChecker, v: Any, path: str) -> Any:
        if self.type == "float":
            return chk.number(v, path, self.low, self.high, low_open=self.low_open)
        if self.type == "int":
            return chk.integer(v, path, None if self.low is None else int(self.low),
                               None if self.high is None else int(self.high))
        if self.type == "bool":
            return chk.boolean(v, path)
        if self.type == "str":
            v = chk.string(v, path)
            if self.choices is not None and v not in self.choices:
                raise chk.err(path, f"unknown value {v!r}; {did_you_mean(v, list(self.choices))}")
            return v
        if self.type == "seq":
            if not isinstance(v, (list, tuple)):
                raise chk.err(path, f"must be a list, got {v!r}")
            return tuple(v)
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise chk.err(path, f"must be a number, string or boolean, got {v!r}")
        return v


def parse_value(chk: SpaceChecker, v: Any, path: str, kind: Kind) -> ParamSpace:
    """A fixed value, a non-empty list of distinct choices, or a Range; checked against ``kind``."""
    if isinstance(v, dict):
        return _parse_range(chk, v, path, kind)
    choices = isinstance(v, list) and (kind.type != "seq" or (bool(v) and all(isinstance(c, list) for c in v)))
    if choices:
        return _parse_choices(chk, v, path, kind)
    return kind.scalar(chk, v, path)


def _parse_range(chk: SpaceChecker, v: dict, path: str, kind: Kind) -> Range:
    """``{low, high, log?, step?}`` as a Range of ``kind`` (its endpoints acceptable values themselves)."""
    if kind.fixed_only or kind.type not in ("float", "int", "any"):
        raise chk.err(path, f"a {{low, high}} range needs a number; {'give one value' if kind.fixed_only else 'give a value or a list of choices'}")
    chk.keys(v, path, ("low", "high", "log", "step"), what="range key")
    for key in ("low", "high"):
        if key not in v:
            raise chk.err(f"{path}.{key}", "missing; a range needs low and high")
    integer = kind.type == "int"
    num = Kind("int" if integer else "float", kind.low, kind.high, kind.low_open)
    low = num.scalar(chk, v["low"], f"{path}.low")
    high = num.scalar(chk, v["high"], f"{path}.high")
    log = chk.boolean(v.get("log", False), f"{path}.log")
    step = v.get("step")
    if low > high:
        raise chk.err(path, f"low ({low:g}) > high ({high:g})")
    if log and low <= 0:
        raise chk.err(f"{path}.low", f"a log range needs low > 0, got {low:g}")
    if step is not None:
        step = (chk.integer(step, f"{path}.step", 1) if integer
                else chk.number(step, f"{path}.step", 0.0, low_open=True))
        if log:
            raise chk.err(f"{path}.step", "a log range cannot have a step")
        if high > low and step > high - low:
            raise chk.err(f"{path}.step", f"{step:g} is larger than the range {low:g}..{high:g}, which would hold "
                                          f"only {low:g}; give a step of at most {high - low:g}, or a fixed value")
    if kind.check is not None:  # endpoints must be acceptable values themselves
        kind.scalar(chk, low, f"{path}.low")
        kind.scalar(chk, high, f"{path}.high")
    return Range(low=low, high=high, log=log, step=step, integer=integer)


def _parse_choices(chk: SpaceChecker, v: list, path: str, kind: Kind) -> list:
    """A non-empty list of distinct values of ``kind``."""
    if kind.fixed_only:
        raise chk.err(path, f"must be one value, not a list of choices, got {v!r}")
    if kind.type == "seq":
        raise chk.err(path, "choices between lists are not supported; give one list")
    if not v:
        raise chk.err(path, "empty list of choices; give at least one value")
    out = [kind.scalar(chk, c, f"{path}[{i}]") for i, c in enumerate(v)]
    seen: list[Any] = []
    for c in out:
        if any(c == s and type(c) is type(s) for s in seen):
            raise chk.err(path, f"choice {c!r} is listed twice")
        seen.append(c)
    return out


def space_kinds() -> dict[str, Kind]:
    from ..engine.allocate import MODES
    from ..methods import list_methods

    return {
        "method": Kind("str", choices=tuple(list_methods())),
        "target": Kind("float", 0.0, 1.0, low_open=True),
        "allocation": Kind("str", choices=tuple(MODES)),
        "buckets": Kind("int", 1, limits.MAX_BUCKETS, fixed_only=True),
        "log_ratio": Kind("float", -8.0, 8.0),
        "residual": Kind("float", -8.0, 8.0),
        "epochs": Kind("int", 1, limits.MAX_EPOCHS),
        "lr": Kind("float", 0.0, low_open=True),
        "batch_size": Kind("int", 1, limits.MAX_BATCH_SIZE),
        "distill": Kind("float", 0.0, 1.0),
        "distill_temperature": Kind("float", 0.0, low_open=True),
    }


SPACE_DEFAULTS: dict[str, Any] = {
    "target": Range(0.2, 0.8), "allocation": ["uniform", "global", "searched"], "buckets": 3,
    "log_ratio": Range(-1.0, 1.0), "residual": Range(-1.0, 1.0), "epochs": 3, "lr": 0.01, "batch_size": 128,
    "distill": 0.0, "distill_temperature": 4.0,
}


def param_kind(method: Any, f: dataclasses.Field) -> tuple[Kind, Any]:
    """Kind and default of one field of ``method.Params``; values are checked by building Params."""
    from ..methods import make_params

    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = dataclasses.MISSING
    types = {bool: "bool", int: "int", float: "float", str: "str", tuple: "seq", list: "seq"}
    name = types.get(type(default))
    nullable = default is None
    if name is None:  # no usable default: read the annotation
        try:
            hint = str(typing.get_type_hints(method.Params).get(f.name, ""))
        except Exception:  # noqa: BLE001 - annotations we cannot evaluate: accept any scalar
            hint = str(f.type)
        nullable = nullable or "None" in hint or "Optional" in hint
        name = next((t for t in ("bool", "int", "float", "str") if re.search(rf"\b{t}\b", hint)), "any")

    def check(value: Any) -> None:
        make_params(method, {f.name: list(value) if isinstance(value, tuple) else value})

    return Kind(name, nullable=nullable, check=check), default


def parse_space(chk: SpaceChecker, raw: Any) -> tuple[dict[str, ParamSpace], dict[str, dict[str, ParamSpace]]]:
    """``space`` -> (search parameters, per-method parameters); every default filled in."""
    from ..methods import get_method, list_methods

    raw = {} if raw is None else raw
    if isinstance(raw, dict) and "multiplier" in raw:
        raise chk.err("space.multiplier", "replaced by log_ratio (log2 of each depth bucket's keep-ratio multiplier "
                                          "relative to the first, K-1 values; e.g. {low: -1, high: 1}) and residual "
                                          "(log2 multiplier of residual-coupled groups; 0 for none)")
    kinds = space_kinds()
    chk.keys(raw, "space", [*kinds, "methods"], what="key")
    space: dict[str, ParamSpace] = {"method": list_methods()} | SPACE_DEFAULTS
    for key, kind in kinds.items():
        if key in raw:
            space[key] = parse_value(chk, raw[key], f"space.{key}", kind)
    chosen = space["method"] if isinstance(space["method"], list) else [space["method"]]
    methods_raw = raw.get("methods") or {}
    chk.keys(methods_raw, "space.methods", list_methods(), what="method")
    method_space: dict[str, dict[str, ParamSpace]] = {}
    for name in [*chosen, *sorted(set(methods_raw) - set(chosen))]:
        method = get_method(name)
        given = methods_raw.get(name) or {}
        path = f"space.methods.{name}"
        params = {f.name: f for f in dataclasses.fields(method.Params)}
        if given and not params:
            raise chk.err(f"{path}.{next(iter(given))}", f"unknown parameter; {name} has no parameters")
        chk.keys(given, path, list(params), what="parameter")
        out: dict[str, ParamSpace] = {}
        for pname, f in params.items():
            kind, default = param_kind(method, f)
            if pname in given:
                out[pname] = parse_value(chk, given[pname], f"{path}.{pname}", kind)
            elif default is dataclasses.MISSING:
                raise chk.err(f"{path}.{pname}", "missing; this parameter has no default")
            else:
                out[pname] = tuple(default) if isinstance(default, list) else default
        if name in chosen:
            method_space[name] = out
        else:
            log.info("%s: space.methods.%s is ignored: %s is not in space.method", chk.source, name, name)
    return space, method_space
