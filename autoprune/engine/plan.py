"""Plans (kept channels per group) and safe checkpoints of base and pruned models.

A checkpoint is a dict of plain types and tensors, loadable with ``torch.load(weights_only=True)``:
``{"format", "model" (ModelSpec), "data" (DataSpec), "split_hash" (of the data's train/val/test
indices, see :mod:`autoprune.data.splits`), "plan" (pruned only), "state_dict", "state_metadata" (the state
dict's per-module versions), "metrics"}``.
A pruned model is rebuilt by creating the base architecture, applying the Plan, and loading the
state dict: no pickled modules, so files survive refactors and cannot run code when loaded.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.splits import split_hash_of
from ..errors import AutopruneError, CheckpointError
from ..models.registry import ModelSpec, create_model
from ..trust import TrustCode, TrustError, accepts_trust_code
from .graph import ChannelGroup, find_groups, remove_channels

log = logging.getLogger(__name__)

BASE_FORMAT = "autoprune.base/1"
PRUNED_FORMAT = "autoprune.pruned/1"


@dataclass(frozen=True)
class Plan:
    """For each pruned channel group, the kept channel indices (sorted); absent groups keep all."""

    keep: Mapping[str, tuple[int, ...]]
    channels: Mapping[str, int] = field(default_factory=dict)  # original widths, to detect a mismatch

    def widths(self) -> dict[str, int]:
        return {name: len(kept) for name, kept in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"keep": {k: list(v) for k, v in self.keep.items()}, "channels": dict(self.channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        try:
            keep = {str(k): tuple(int(i) for i in v) for k, v in d["keep"].items()}
            channels = {str(k): int(v) for k, v in d.get("channels", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"malformed plan ({exc}); expected {{'keep': {{group: [indices]}}}}") from exc
        return cls(keep=keep, channels=channels)

    @classmethod
    def from_keep(cls, keep: Mapping[str, tuple[int, ...]], groups: list[ChannelGroup]) -> Plan:
        by_name = {g.name: g for g in groups}
        pruned = {k: tuple(sorted(v)) for k, v in keep.items() if len(v) < by_name[k].channels}
        return cls(keep=pruned, channels={k: by_name[k].channels for k in pruned})


def apply_plan(model: nn.Module, groups: list[ChannelGroup], plan: Plan) -> nn.Module:
    """Physically remove the channels ``plan`` drops, in place; returns ``model``."""
    by_name = {g.name: g for g in groups}
    for name, n in plan.channels.items():
        if name not in by_name:
            raise AutopruneError(f"plan names channel group {name!r}, which this model does not have; "
                                 "was the plan made for another architecture?")
        if by_name[name].channels != n:
            raise AutopruneError(f"plan expects {n} channels in group {name!r}, the model has "
                                 f"{by_name[name].channels}; was the plan made for another architecture?")
    remove_channels(model, groups, plan.keep)
    return model


def _save(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomic and through memory (:func:`autoprune.files.save_torch`): an interrupted save never leaves a
    half-written checkpoint, and a full disk or read-only folder is one line (``FileWriteError``)."""
    from ..files import save_torch

    save_torch(path, payload)


def _state(model: nn.Module) -> dict[str, Any]:
    """``{"state_dict": plain dict of CPU tensors, "state_metadata": the state dict's ``_metadata``}``.

    ``_metadata`` holds each module's version (``{"layer1.0": {"version": 2}}``), which modules such as
    torchvision's MNASNet read in ``_load_from_state_dict``; a plain dict would lose it."""
    state = model.state_dict()
    meta = getattr(state, "_metadata", None) or {}
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
            "state_metadata": _plain({str(k): dict(v) for k, v in meta.items()}, "state_metadata")}


def with_metadata(state: Mapping[str, torch.Tensor], model: nn.Module | None,
                  metadata: Mapping[str, Any] | None = None) -> OrderedDict:
    """``state`` as the OrderedDict ``load_state_dict`` expects, with ``_metadata``: ``metadata`` (saved
    with the weights), else the state's own, else that of ``model``'s freshly built state dict."""
    out = OrderedDict(state)
    meta = metadata or getattr(state, "_metadata", None)
    if not meta and model is not None:
        meta = getattr(model.state_dict(), "_metadata", None)
    meta = meta or {}
    out._metadata = OrderedDict((str(k), dict(v)) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


def save_base(path: str | Path, model: nn.Module, spec: ModelSpec, data: Any = None,
              metrics: Mapping[str, Any] | None = None, split_hash: str | None = None) -> None:
    """Save a base (unpruned) model: spec + state_dict + data spec + metrics (+ the split's hash).

    ``data`` is a :class:`~autoprune.data.datasets.DataSpec` (or its dict), or a loaded
    :class:`~autoprune.data.datasets.Dataset`, whose split hash is then recorded too (``split_hash`` overrides it).
    Metrics may hold numpy scalars and arrays: they are stored as Python numbers and lists, so the
    file loads with ``torch.load(weights_only=True)``. Raises ``CheckpointError`` for a metric value
    that cannot be stored safely (named by its key).
    """
    _save(path, {"format": BASE_FORMAT, "model": spec.to_dict(), **_data_fields(data, split_hash),
                 **_state(model), "metrics": _plain(dict(metrics or {}), "metrics")})


def save_pruned(path: str | Path, model: nn.Module, spec: ModelSpec, plan: Plan, data: Any = None,
                metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                split_hash: str | None = None) -> None:
    """Save a pruned model as base spec + Plan + state_dict (+ data spec, split hash, metrics, extra info)."""
    _save(path, {"format": PRUNED_FORMAT, "model": spec.to_dict(), **_data_fields(data, split_hash),
                 "plan": plan.to_dict(), **_state(model),
                 "metrics": _plain(dict(metrics or {}), "metrics"), "extra": _plain(dict(extra or {}), "extra")})


def _data_fields(data: Any, split_hash: str | None) -> dict[str, Any]:
    """``{"data": spec dict or None, "split_hash": str or None}`` from a DataSpec, its dict or a Dataset."""
    spec = getattr(data, "spec", data)  # a loaded Dataset carries its spec and its split hash
    if split_hash is None and data is not None:
        split_hash = split_hash_of(data)  # a DataSpec: the hash of its data loaded in this process
    if spec is not None and not isinstance(spec, dict):
        spec = spec.to_dict()
    return {"data": _plain(spec, "data") if spec is not None else None, "split_hash": split_hash}


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars/arrays, paths and sets turned into the plain types a safe load accepts."""
    import numpy as np

    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass torch refuses to load
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v, where) for v in value)
    raise CheckpointError(f"{where} holds a {type(value).__name__}, which a safe checkpoint cannot store; "
                          "give numbers, strings, lists, dicts or tensors")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely; missing, corrupt or foreign files raise ``CheckpointError``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; give the .pt file (e.g. {path / 'base.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `autoprune train --out {path}`")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = _refused_global(str(exc)) or _first_global(path)
        if refused and refused.split(".")[0] in ("numpy", "torch", "collections", "builtins"):
            raise CheckpointError(f"checkpoint {path} holds a {refused} object, which safe loading "
                                  "(torch.load weights_only=True) refuses; re-save it with autoprune.save_base / "
                                  "save_pruned, which store numpy values as plain numbers") from exc
        if refused:
            raise CheckpointError(f"checkpoint {path} holds a pickled {refused} call, code that loading would run; "
                                  "safe loading refused it and ran nothing: it is no autoprune checkpoint, do not "
                                  "load it with weights_only=False unless you trust where it came from") from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({type(exc).__name__}); re-create it") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (BASE_FORMAT, PRUNED_FORMAT):
        raise CheckpointError(f"{path} is not an autoprune checkpoint (no 'format' key); autoprune saves "
                              "models with `autoprune train` / `autoprune prune`")
    for key in ("model", "state_dict", *(("plan",) if ckpt["format"] == PRUNED_FORMAT else ())):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"checkpoint {path} has no valid {key!r} (a mapping); the file is damaged or was "
                                  "not written by autoprune: re-create it")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise CheckpointError(f"checkpoint {path}: its state_dict holds something other than named tensors; "
                              "re-create it")
    return ckpt


def _refused_global(message: str) -> str:
    """The class a weights-only load refused ('numpy._core.multiarray.scalar'), or ''."""
    import re

    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
    return found.group(1) if found else ""


def _first_global(path: Path) -> str:
    """The first ``module.name`` a pickle (or a torch zip archive's ``data.pkl``) imports, read with
    :mod:`pickletools` (which decodes opcodes and runs nothing); '' when there is none or it is unreadable."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()[:1 << 20]
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a hint only: any unreadable file is "corrupt" instead
        return ""
    return ""


def _load_state(model: nn.Module, ckpt: Mapping[str, Any], path: Path) -> None:
    state = ckpt["state_dict"]
    modules = dict(model.named_modules())
    for key, value in state.items():  # compensation may have given a bias-free conv a bias
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if attr == "bias" and isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(value))
    try:
        model.load_state_dict(with_metadata(state, model, ckpt.get("state_metadata")), strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{path}: weights do not fit the architecture ({first})") from exc


@accepts_trust_code
def load_base(path: str | Path, device: str | torch.device = "cpu", *, trust_code: TrustCode = None
              ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a base model (or a pruned one) from a checkpoint; returns (model, checkpoint dict).

    A checkpoint naming a ``package.module:function`` model imports it only if the user trusts that
    module (``trust_code``, see :mod:`autoprune.trust`); otherwise ``TrustError``, nothing imported."""
    ckpt = read_checkpoint(path)
    if ckpt["format"] == PRUNED_FORMAT:
        return load_pruned(path, device)
    spec = ModelSpec.from_dict(ckpt["model"])
    model = _create(spec, path)
    _load_state(model, ckpt, Path(path))
    return model.to(device).eval(), ckpt


def _create(spec: ModelSpec, path: str | Path) -> nn.Module:
    try:
        return create_model(spec)
    except TrustError as exc:
        raise TrustError(f"checkpoint {path}: {exc}") from None


@accepts_trust_code
def load_pruned(path: str | Path, device: str | torch.device = "cpu", *, trust_code: TrustCode = None
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model: base architecture -> apply its Plan -> load its state_dict (``trust_code``:
    as in :func:`load_base`)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if ckpt["format"] != PRUNED_FORMAT:
        raise CheckpointError(f"{path} holds a base model, not a pruned one; use load_base")
    spec = ModelSpec.from_dict(ckpt["model"])
    model = _create(spec, path).eval()
    plan = Plan.from_dict(ckpt["plan"])
    groups = find_groups(model, (spec.in_channels, spec.image_size, spec.image_size), check=False)
    apply_plan(model, groups, plan)
    _load_state(model, ckpt, path)
    return model.to(device).eval(), ckpt
